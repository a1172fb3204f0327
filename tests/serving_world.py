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
    run_sids(SidConfig(ingest_dir=ingest, out=sids, quantizer="rqkmeans", embed_on="local",
                       embed_dim=32, seed=seed))
    out = {"ingest": ingest, "sids": sids}
    if index:
        from leadre.index import IndexConfig, run as run_index

        out["index"] = str(root / "index")
        run_index(IndexConfig(sids_dir=sids, ingest_dir=ingest, out=out["index"]))
    return out
