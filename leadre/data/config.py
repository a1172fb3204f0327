"""The configurations of stage 1: ``SynthConfig`` (``leadre generate``, the synthetic ad world)
and ``IngestConfig`` (``leadre ingest``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from leadre.config import ConfigError
from leadre.data import schema
from leadre.data.vocab import CATEGORIES
from leadre.runtime import RayConfig


@dataclass
class SynthConfig:
    """Size, seed and the strength of each latent effect of the synthetic world."""

    out: str = field(default="runs/world", metadata={"help": "output directory (or URI)"})
    users: int = field(default=2000, metadata={"help": "number of users"})
    ads: int = field(default=1000, metadata={"help": "number of ads"})
    seed: int = field(default=0, metadata={"help": "random seed; same seed, same world"})
    mean_events: float = field(default=40.0, metadata={
        "help": "mean number of impressions + content events per user (clicks and conversions "
                "come on top)"})
    min_events: int = field(default=8, metadata={"help": "minimum events per user"})
    start: str = field(default="2025-01-01", metadata={"help": "first day of the log (UTC)"})
    days: int = field(default=60, metadata={"help": "length of the log in days"})
    ad_share: float = field(default=0.6, metadata={"help": "share of events that are ad impressions"})
    video_share: float = field(default=0.25, metadata={"help": "share of events that are video plays"})
    interest_alpha: float = field(default=0.25, metadata={
        "help": "Dirichlet concentration per category of user interests; lower = more focused users"})
    profile_strength: float = field(default=1.5, metadata={
        "help": "how strongly the profile shifts the interest prior (0 = profiles carry no signal)"})
    content_on_interest: float = field(default=0.85, metadata={
        "help": "probability that a video/news event comes from the user's interests"})
    impression_on_interest: float = field(default=0.5, metadata={
        "help": "probability that an ad impression is targeted at the user's interests"})
    click_base: float = field(default=0.02, metadata={"help": "click probability at zero interest"})
    click_slope: float = field(default=1.2, metadata={
        "help": "added click probability per unit of interest in the ad's category"})
    conversion_rate: float = field(default=0.2, metadata={
        "help": "conversion probability of a click in a category the user is fully into"})
    popularity_skew: float = field(default=0.8, metadata={
        "help": "Zipf exponent of ad popularity within a category"})
    inactive_share: float = field(default=0.1, metadata={"help": "share of ads switched off"})
    profile_missing: float = field(default=0.1, metadata={
        "help": "probability that each profile attribute is unknown (null)"})
    corrupt_share: float = field(default=0.0, metadata={
        "help": "share of extra malformed event rows (duplicates, unknown ads, bad actions, "
                "missing users, out-of-range times) to exercise the ingest quarantine"})
    rows_per_file: int = field(default=1_000_000, metadata={"help": "rows per parquet shard"})

    def __post_init__(self) -> None:
        if self.users < 1 or self.ads < len(CATEGORIES):
            raise ConfigError(f"need users >= 1 and ads >= {len(CATEGORIES)} (one per category); "
                              f"got users={self.users}, ads={self.ads}")
        if self.min_events < 2 or self.mean_events < self.min_events:
            raise ConfigError("need 2 <= min_events <= mean_events")
        for name in ("ad_share", "video_share", "content_on_interest", "impression_on_interest",
                     "inactive_share", "profile_missing", "conversion_rate", "corrupt_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.ad_share + self.video_share > 1.0:
            raise ConfigError("ad_share + video_share must be <= 1 (news takes the rest)")
        if self.days < 1:
            raise ConfigError("days must be >= 1")
        try:
            np.datetime64(self.start, "D")
        except ValueError:
            raise ConfigError(f"start {self.start!r} is not a date like 2025-01-01") from None


@dataclass
class IngestConfig:
    """Where raw logs come from, what counts as valid, and where the tables go.

    ``cold_fraction`` turns on the cold-start split (issue 24): the ``round(cold_fraction *
    active ads)`` active ads with the smallest hash of (``cold_seed``, ad_id) get
    ``cold = true`` in the written ``ads`` table (the column is only written when the split is
    on; without it no ad is cold). Ingest only marks them: ``leadre sids`` fits its encoder
    and quantiser on the warm ads and records the cold set in its manifest
    (:func:`leadre.sids.build.load_cold_ads`, how every later stage finds it), ``leadre
    prompts`` keeps cold ads out of every training interaction, and ``leadre eval`` scores
    cold and warm targets apart.
    """

    input_dir: str = field(default="runs/world", metadata={
        "help": "for source=parquet a directory with ads/, users/, events/ parquet "
                "(e.g. the output of `leadre generate`); for source=lcrec a directory with "
                "<Name>.inter.json [+ .item.json, .index.json]"})
    out: str = field(default="runs/ingest", metadata={"help": "output directory (or URI)"})
    source: Literal["parquet", "lcrec"] = field(default="parquet", metadata={
        "help": "input format"})
    dataset_name: str | None = field(default=None, metadata={
        "help": "lcrec: the <Name> of <Name>.inter.json when the directory holds several"})
    category_level: int = field(default=1, metadata={
        "help": "lcrec: which entry of the category path becomes the ad category (0 = root)"})
    ecpm: float | None = field(default=None, metadata={
        "help": "lcrec: eCPM given to every item (real datasets have none; null keeps it unknown)"})
    ts_start: str = field(default="2000-01-01", metadata={
        "help": "earliest accepted event time (UTC); older events are quarantined"})
    ts_end: str = field(default="2100-01-01", metadata={
        "help": "latest accepted event time (UTC); newer events are quarantined"})
    max_age: int = field(default=120, metadata={"help": "largest plausible user age"})
    max_title_chars: int = field(default=schema.TextLimits.titles, metadata={
        "help": "longest accepted ad or content title; longer rows are quarantined"})
    max_description_chars: int = field(default=schema.TextLimits.descriptions, metadata={
        "help": "longest accepted ad description; longer rows are quarantined"})
    max_field_chars: int = field(default=schema.TextLimits.fields, metadata={
        "help": "longest accepted other text (category, advertiser, profile, domain, action)"})
    max_quarantine_share: float = field(default=0.2, metadata={
        "help": "fail the job when more than this share of any table is quarantined (a broken "
                "upstream, not dirty data); the quarantine table is still written"})
    batch_size: int = field(default=100_000, metadata={"help": "rows per validation batch"})
    cold_fraction: float = field(default=0.0, metadata={
        "help": "cold-start split: mark this share of the active ads cold (0 = off; 0.1 is the "
                "usual setting, at most 0.5). The S-ID stage fits its quantiser without them "
                "and the prompts stage keeps them out of every training interaction, so they "
                "appear only as test targets; eval reports cold and warm targets apart"})
    cold_seed: int = field(default=0, metadata={
        "help": "seed of the cold-start split: which ads are cold is a hash of "
                "(cold_seed, ad_id)"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={
        "help": "Ray connection (address, num_cpus, object_store_mb)"})

    def __post_init__(self) -> None:
        try:
            start, end = pd.Timestamp(self.ts_start, tz="UTC"), pd.Timestamp(self.ts_end, tz="UTC")
        except ValueError as e:
            raise ConfigError(f"ts_start/ts_end must be dates: {e}") from None
        if start >= end:
            raise ConfigError(f"ts_start {self.ts_start} must be before ts_end {self.ts_end}")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if self.category_level < 0:
            raise ConfigError("category_level must be >= 0")
        for name in ("max_title_chars", "max_description_chars", "max_field_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.max_quarantine_share <= 1.0:
            raise ConfigError(f"max_quarantine_share is a share in [0, 1], got "
                              f"{self.max_quarantine_share}")
        if not 0.0 <= self.cold_fraction <= 0.5:
            raise ConfigError(f"cold_fraction is the share of active ads held out as cold-start "
                              f"targets, in [0, 0.5] (0 = off, 0.1 = the usual split); got "
                              f"{self.cold_fraction}")

    @property
    def text_limits(self) -> schema.TextLimits:
        return schema.TextLimits(self.max_title_chars, self.max_description_chars,
                                 self.max_field_chars)

    @property
    def time_range(self) -> schema.TimeRange:
        return schema.TimeRange(pd.Timestamp(self.ts_start, tz="UTC").to_pydatetime(),
                                pd.Timestamp(self.ts_end, tz="UTC").to_pydatetime())
