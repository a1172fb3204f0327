"""Stage 3, ``leadre prompts``: interaction logs -> intent-aware prompts (main task),
auxiliary alignment tasks and DPO pairs, split leak-free, as sharded parquet::

    <out>/sft/<split>/part-*.parquet    prompt, completion, task, user_id, target_ad_id, template
    <out>/dpo/<split>/part-*.parquet    prompt, chosen, rejected, pair_type, user_id,
                                        chosen_ad_id, rejected_ad_id, chosen_ecpm, rejected_ecpm
    <out>/eval/<split>/part-*.parquet   user_id, prompt, target_ad_id, target_sid, history_ad_ids
    <out>/skipped/part-*.parquet        user_id, reason, detail (users that yield nothing)
    <out>/manifest.json                 counts per split/task, config, sid_version, timings

``split`` is train | valid | test. Templates are data (``leadre.prompt_templates``); the
builder (``builder.py``) is plain Python shared by Ray Data (``pipeline.py``), the
single-process reference and serving (:func:`build_user_prompt`).
"""

from leadre.prompts.builder import (DPO, EVAL, PAIR_TYPES, SFT, SKIPPED, SPLITS, TASKS, Catalog,
                                    Event, Prompt, SplitPlan, approx_tokens, build_ad_rows,
                                    build_user, build_user_prompt, compose_prompt, pick_template)
from leadre.prompts.config import PromptConfig, trained_prompt_config
from leadre.prompts.pipeline import build_local, load_catalog, make_plan, read_output, run

__all__ = ["PromptConfig", "trained_prompt_config", "run", "build_local", "read_output", "build_user_prompt",
           "compose_prompt", "build_user", "build_ad_rows", "approx_tokens", "pick_template",
           "load_catalog", "make_plan", "Catalog", "Event", "Prompt", "SplitPlan",
           "SFT", "DPO", "EVAL", "SKIPPED", "SPLITS", "TASKS", "PAIR_TYPES"]
