"""A small real serving world for the index/serve tests: synthetic ads, users and events
written as an ingest directory, real S-IDs (RQ-KMeans, LSA encoder) and a real ScaNN index."""

from __future__ import annotations

from pathlib import Path

from leadre.artifacts import write_manifest, write_table
from leadre.data.config import SynthConfig
from leadre.data.synth import generate


def make_world(root: Path, ads: int = 600, users: int = 200, seed: int = 0,
               index: bool = True) -> dict[str, str]:
    from leadre.sids import SidConfig, run as run_sids

    world = generate(SynthConfig(users=users, ads=ads, seed=seed))
    ingest = str(root / "ingest")
    for name in ("ads", "users", "events"):
        write_table(getattr(world, name), ingest, name)
    write_manifest(ingest, "ingest", inputs={}, config={}, counts={}, timings={})
    sids = str(root / "sids")
    run_sids(SidConfig(ingest_dir=ingest, out=sids, encoder="lsa", quantizer="rqkmeans",
                       embed_on="local", embed_dim=32, seed=seed))
    out = {"ingest": ingest, "sids": sids}
    if index:
        from leadre.index import IndexConfig, run as run_index

        out["index"] = str(root / "index")
        run_index(IndexConfig(sids_dir=sids, ingest_dir=ingest, out=out["index"]))
    return out


def tiny_model(world: dict, out: Path, stage: str = "sft", prompts: int = 500) -> str:
    """An untrained ``tiny`` LM for ``world``'s S-IDs, its tokenizer trained on the first
    ``prompts`` users' prompts, written as a ``stage`` output (``merged/`` + manifest with the
    S-ID version): what the LLM generator loads; decoding costs the same trained or not."""
    from leadre.index.context import build_prompt, user_contexts
    from leadre.model.factory import prepare_base_model
    from leadre.sids import load_table

    table = load_table(world["sids"])
    contexts = list(user_contexts(world["ingest"]).values())[:prompts]
    prepare_base_model(Path(out) / "merged", sid_tokens=table.tokens(), base_model=None,
                       preset="tiny", corpus=[build_prompt(c, table) for c in contexts])
    write_manifest(str(out), stage, inputs={"sids_dir": world["sids"]}, config={}, counts={},
                   timings={}, extra={"sid_version": table.version})
    return str(out)
