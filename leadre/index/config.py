"""``IndexConfig``: the configuration of stage 7, ``leadre index``."""

from __future__ import annotations

from dataclasses import dataclass, field

from leadre.sids.ann import AnnConfig


@dataclass
class IndexConfig(AnnConfig):
    """Configuration of stage 7, ``leadre index``: ScaNN over the active ads' embeddings; the
    searcher's build and tuning knobs are :class:`~leadre.sids.ann.AnnConfig`'s.

    Parameters:
        sids_dir: output of ``leadre sids`` (its ``embeddings`` and ``sid_table`` are read).
        ingest_dir: optional output of ``leadre ingest``: its ``ads`` table supplies the
            *current* active flags (ads switched on/off since the S-IDs were built) and eCPM,
            its ``events`` the popularity used for the cold-start fallback list.
        out: index directory to write.
        history_events: events of a user's history per query (the matcher's own setting).
        fallback_size: length of the popularity list used when a user has no signal at all.
    """

    sids_dir: str = field(default="runs/sids", metadata={
        "help": "output directory of `leadre sids` (embeddings + S-ID table)"})
    ingest_dir: str | None = field(default=None, metadata={
        "help": "optional `leadre ingest` output: current active flags + eCPM (ads) and "
                "popularity (events) for the cold-start fallback"})
    out: str = field(default="runs/index", metadata={"help": "index directory to write"})
    history_events: int = field(default=20, metadata={
        "help": "events of a user's history per query (as the matcher builds them)"})
    fallback_size: int = field(default=200, metadata={
        "help": "length of the popularity list used when a user has no signal at all"})
