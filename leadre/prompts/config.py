"""``PromptConfig``: every knob of stage 3, ``leadre prompts``, documented where it is declared."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pandas as pd

from leadre.config import ConfigError
from leadre.prompts.templates import PROMPT_TEMPLATES
from leadre.runtime import RayConfig
from leadre.data.schema import ACTIONS

FACETS = ("instruction", "profile", "categories", "behaviours", "question")


@dataclass
class PromptConfig:
    """Configuration of stage 3: logs -> intent-aware prompts, auxiliary tasks, DPO pairs.

    Inputs and outputs:
        ingest_dir: output of ``leadre ingest`` (ads, users, events).
        sids_dir: output of ``leadre sids`` (the S-ID table; its version goes in the manifest).
        out: artifact directory: ``sft/<split>``, ``dpo/<split>``, ``eval/<split>``,
            ``skipped`` (parquet shards) and ``manifest.json``.

    Splits (leak-free: a training example never sees an event at or after ``valid_start``):
        split: ``time`` (synthetic logs: train / valid / test windows), ``leave_one_out``
            (real datasets: last engagement test, second-to-last valid, earlier ones train),
            ``auto`` = leave_one_out when the ingest came from LC-Rec JSON, else time.
        valid_days / test_days: with split=time and no explicit dates, the test window is the
            last ``test_days`` of the log and the valid window the ``valid_days`` before it.
        valid_start / test_start: explicit window starts (UTC dates or timestamps).

    Prompt facets (the paper's intent-aware prompt; switch any off for ablations):
        instruction, profile, categories (long-term: top ad categories as ``category^N
        times``), behaviours (short-term: ``N days ago^behaviour^object``), question.
        history_actions: which actions appear in the behaviour sequence; drop ``play`` and
            ``read`` for the "no cross-domain facets" ablation.
        category_actions: which ad actions count towards the long-term categories.
        content_object: how a content event (video, news) shows its object: ``title`` (the
            words), ``code`` (its knowledge token: the title's frozen vector quantised by the
            ads' quantiser, the first ``content_code_levels`` S-ID tokens, from
            ``<sids>/titles``), or ``title_code`` (both). Ad events show their S-ID, which is
            their own vector's code, so with ``code`` every history event carries its vector.
        Limits: max_events (most recent behaviours kept; also the length of
        ``history_ad_ids``; 20 = the leave-one-out protocol), max_categories,
        max_prompt_tokens (approximate, see ``leadre.prompts.approx_tokens``; oldest behaviours
        are dropped first, then the rarest categories, then the profile).

    Auxiliary tasks (mixing ratios are shares in [0, 1], picked by a hash, so deterministic):
        aux_text2sid / aux_sid2text: share of catalog ads that get an ad text -> S-ID /
            S-ID -> text example (train split only; catalog knowledge, no user data).
        aux_titles: share of main examples that also appear with ad titles in place of S-IDs.

    DPO pairs (one prompt, two S-IDs):
        dpo_share: share of main examples that get pairs.
        dpo_value_pairs: value pairs per prompt: the true target and another *relevant* ad
            (active, same category as the target, eCPM known), the one with the higher eCPM
            chosen, only when the eCPMs differ by more than ``value_margin`` (relative).
        dpo_random_negatives / dpo_hard_negatives: interest pairs per prompt: chosen = the
            true target, rejected = an active ad the user did not engage with in the split's
            visible window (hard: sharing the target's first S-ID level).
    """

    ingest_dir: str = field(default="runs/ingest", metadata={
        "help": "output directory of `leadre ingest`"})
    sids_dir: str = field(default="runs/sids", metadata={
        "help": "output directory of `leadre sids` (the S-ID table)"})
    out: str = field(default="runs/prompts", metadata={
        "help": "artifact directory to write (local path or pyarrow URI such as s3://...)"})

    # --- splits -------------------------------------------------------------------------
    split: Literal["auto", "time", "leave_one_out"] = field(default="auto", metadata={
        "help": "auto: leave_one_out for LC-Rec datasets, time for logs with real timestamps"})
    valid_days: int = field(default=7, metadata={
        "help": "split=time: days in the valid window (before the test window)"})
    test_days: int = field(default=7, metadata={
        "help": "split=time: days in the test window (at the end of the log)"})
    valid_start: str | None = field(default=None, metadata={
        "help": "split=time: explicit start of the valid window (UTC), overrides valid_days"})
    test_start: str | None = field(default=None, metadata={
        "help": "split=time: explicit start of the test window (UTC), overrides test_days"})

    # --- facets and limits --------------------------------------------------------------
    instruction: bool = field(default=True, metadata={"help": "facet: the instruction"})
    profile: bool = field(default=True, metadata={
        "help": "facet: the profile sentence (omitted anyway when nothing is known)"})
    categories: bool = field(default=True, metadata={
        "help": "facet: long-term interest as `category^N times`"})
    behaviours: bool = field(default=True, metadata={
        "help": "facet: short-term interest as `N days ago^behaviour^object`"})
    question: bool = field(default=True, metadata={"help": "facet: the question"})
    history_actions: list[str] = field(
        default_factory=lambda: ["click", "conversion", "play", "read"], metadata={
            "help": "actions shown in the behaviour sequence (drop play/read: no cross-domain)"})
    category_actions: list[str] = field(default_factory=lambda: ["click", "conversion"], metadata={
        "help": "ad actions that count towards the long-term categories"})
    max_events: int = field(default=20, metadata={
        "help": "most recent behaviours in a prompt (and length of history_ad_ids)"})
    max_categories: int = field(default=5, metadata={"help": "top categories in a prompt"})
    content_object: Literal["title", "code", "title_code"] = field(default="code", metadata={
        "help": "content events (video, news) show: title (words), code (the title vector's "
                "knowledge token from the S-ID stage's quantiser), or title_code (both)"})
    content_code_levels: int = field(default=2, metadata={
        "help": "S-ID levels in a content title's code (coarse levels carry its topic)"})
    max_prompt_tokens: int = field(default=512, metadata={
        "help": "approximate token budget of a prompt; oldest behaviours are dropped first"})
    min_history: int = field(default=1, metadata={
        "help": "earlier events (of any kind) a target needs to become an example"})
    templates: list[int] | None = field(default=None, metadata={
        "help": "template variants to use (indices into leadre.prompts.templates); null = all"})

    # --- auxiliary tasks ----------------------------------------------------------------
    aux_text2sid: float = field(default=1.0, metadata={
        "help": "share of ads with an ad text -> S-ID example (train)"})
    aux_sid2text: float = field(default=1.0, metadata={
        "help": "share of ads with an S-ID -> ad text example (train)"})
    aux_titles: float = field(default=0.5, metadata={
        "help": "share of main examples repeated with ad titles instead of S-IDs"})

    # --- DPO ----------------------------------------------------------------------------
    dpo_share: float = field(default=1.0, metadata={
        "help": "share of main examples that get DPO pairs"})
    dpo_value_pairs: int = field(default=1, metadata={
        "help": "value pairs per prompt (higher vs lower eCPM among relevant ads)"})
    dpo_random_negatives: int = field(default=1, metadata={
        "help": "interest pairs per prompt with a random non-engaged ad as rejected"})
    dpo_hard_negatives: int = field(default=1, metadata={
        "help": "interest pairs per prompt with a non-engaged ad sharing the first S-ID level"})
    value_margin: float = field(default=0.1, metadata={
        "help": "value pairs need eCPM(chosen) > (1 + margin) * eCPM(rejected)"})

    # --- execution ----------------------------------------------------------------------
    seed: int = field(default=0, metadata={
        "help": "seed of every sampled choice (templates, mixing, negatives)"})
    engine: Literal["auto", "shards", "groupby"] = field(default="auto", metadata={
        "help": "shards: a pool of builder actors, one user shard of the ingest output per "
                "call, no shuffle (needs the layout the ingest manifest records as "
                "events_layout); groupby: hash-shuffle "
                "events by user_id, then one Python call per user (any ingest directory); "
                "auto: shards when the ingest manifest vouches for the layout, else groupby"})
    partitions: int | None = field(default=None, metadata={
        "help": "engine=groupby: group-by partitions (= build tasks); default from event "
                "count and CPUs"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={
        "help": "how to reach Ray (set ray.address=auto under `ray job submit`)"})

    def __post_init__(self) -> None:
        for name in ("valid_days", "test_days"):
            if getattr(self, name) < 0:
                raise ConfigError(f"prompts: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("valid_start", "test_start"):
            value = getattr(self, name)
            if value is not None:
                try:
                    pd.Timestamp(value)
                except ValueError:
                    raise ConfigError(f"prompts: {name} {value!r} is not a date like "
                                      "2025-02-15") from None
        if self.valid_start and self.test_start and (
                pd.Timestamp(self.valid_start) > pd.Timestamp(self.test_start)):
            raise ConfigError("prompts: valid_start must not be after test_start")
        for name in ("history_actions", "category_actions"):
            bad = sorted(set(getattr(self, name)) - ACTIONS)
            if bad:
                raise ConfigError(f"prompts: {name} has unknown action(s) {bad}; "
                                  f"valid: {sorted(ACTIONS)}")
        if self.content_code_levels < 1:
            raise ConfigError("prompts: content_code_levels must be >= 1, got "
                              f"{self.content_code_levels}")
        for name in ("max_events", "max_categories", "min_history"):
            if getattr(self, name) < 0:
                raise ConfigError(f"prompts: {name} must be >= 0, got {getattr(self, name)}")
        if self.max_prompt_tokens < 16:
            raise ConfigError("prompts: max_prompt_tokens must be >= 16 (instruction and "
                              "question alone take about that many)")
        if self.templates is not None:
            bad = [t for t in self.templates if not 0 <= t < len(PROMPT_TEMPLATES)]
            if bad or not self.templates:
                raise ConfigError(f"prompts: templates must be a non-empty list of indices in "
                                  f"[0, {len(PROMPT_TEMPLATES) - 1}], got {self.templates}")
        for name in ("aux_text2sid", "aux_sid2text", "aux_titles", "dpo_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"prompts: {name} is a share in [0, 1], got {getattr(self, name)}")
        for name in ("dpo_value_pairs", "dpo_random_negatives", "dpo_hard_negatives"):
            if getattr(self, name) < 0:
                raise ConfigError(f"prompts: {name} must be >= 0, got {getattr(self, name)}")
        if self.value_margin < 0:
            raise ConfigError("prompts: value_margin must be >= 0")
        if self.partitions is not None and self.partitions < 1:
            raise ConfigError("prompts: partitions must be >= 1 (or null for automatic)")
        if not any(getattr(self, f) for f in FACETS):
            raise ConfigError(f"prompts: at least one facet of {list(FACETS)} must be on")

    @property
    def template_ids(self) -> list[int]:
        return list(self.templates) if self.templates is not None else list(range(len(PROMPT_TEMPLATES)))


def trained_prompt_config(model_dir: str) -> PromptConfig:
    """The ``PromptConfig`` a ``leadre sft`` / ``leadre dpo`` model was trained with (its
    manifest's ``prompt_config``), so that serving builds prompts with the same facets and
    limits as training. A directory without one (a plain Hugging Face model) gets the
    defaults, with a warning."""
    import dataclasses
    import logging

    from leadre.artifacts import ArtifactError, read_manifest
    from leadre.config import from_dict

    try:
        recorded = read_manifest(model_dir).get("prompt_config")
    except ArtifactError:
        recorded = None
    if not isinstance(recorded, dict):
        logging.getLogger(__name__).warning(
            "%s records no prompt_config (not a leadre sft/dpo output?): serving uses the "
            "default PromptConfig, which may differ from how the model was trained", model_dir)
        return PromptConfig()
    known = {f.name for f in dataclasses.fields(PromptConfig)}
    recorded.setdefault("content_object", "title")  # trained before knowledge tokens existed
    return from_dict(PromptConfig, {k: v for k, v in recorded.items() if k in known})
