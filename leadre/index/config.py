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


@dataclass
class AddAdsConfig:
    """Configuration of ``leadre add-ads``: ads new to the catalog, added without retraining
    (:mod:`leadre.index.add_ads`). Each gets its vector from the S-ID stage's frozen encoder,
    its S-ID from the trained quantiser (the disambiguation level resolves collisions within
    the codes the model knows) and a place in a new index version; the S-ID version stays, so
    the trained model keeps serving. All or nothing: one unusable ad refuses the request.

    Parameters:
        sids_dir: output of ``leadre sids`` to extend (its ``sid_table``, ``embeddings``,
            ``added_ads`` and manifest are rewritten; nothing else).
        index_dir: the index in use; the new version is built with its recorded settings.
        ads: the new ads, a ``.jsonl`` / ``.json`` (a list of objects) / ``.parquet`` / ``.csv``
            file with the ingest ``ads`` columns: ad_id, title, category (required),
            description, advertiser, ecpm, active (default true).
        out: directory of the new index version; default: beside ``index_dir`` as
            ``<index_dir>.ads<N>`` (the first N free), so it lies under the matcher's index root.
        max_title_chars / max_description_chars / max_field_chars: text limits; default (null):
            the limits the ingest stage held the catalog's ads to (its recorded config).
    """

    sids_dir: str = field(default="runs/sids", metadata={
        "help": "output directory of `leadre sids` to extend with the new ads"})
    index_dir: str = field(default="runs/index", metadata={
        "help": "the index in use; the new index version is built with its recorded settings"})
    ads: str | None = field(default=None, metadata={
        "help": "file of new ads (.jsonl, .json, .parquet or .csv) with the ingest ads columns: "
                "ad_id, title, category required; description, advertiser, ecpm, active"})
    out: str | None = field(default=None, metadata={
        "help": "directory of the new index version (default: <index_dir>.ads<N>, beside it)"})
    max_title_chars: int | None = field(default=None, metadata={
        "help": "longest accepted title (null: the ingest stage's recorded limit)"})
    max_description_chars: int | None = field(default=None, metadata={
        "help": "longest accepted description (null: the ingest stage's recorded limit)"})
    max_field_chars: int | None = field(default=None, metadata={
        "help": "longest accepted category / advertiser (null: the ingest stage's limit)"})

    def __post_init__(self) -> None:
        from leadre.config import ConfigError

        if not self.ads:
            raise ConfigError("add-ads: set ads, the file of new ads (.jsonl, .json, .parquet "
                              "or .csv)")
        if not self.sids_dir or not self.index_dir:
            raise ConfigError("add-ads: set sids_dir and index_dir")
        if self.out is not None and self.out.rstrip("/") == self.index_dir.rstrip("/"):
            raise ConfigError("add-ads: out must be a new directory, not the index in use "
                              "(the matcher swaps whole index versions)")
        for name in ("max_title_chars", "max_description_chars", "max_field_chars"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"add-ads: {name} must be >= 1 or null, got {v}")
