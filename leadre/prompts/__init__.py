"""Stage 3, ``leadre prompts``: interaction logs -> intent-aware prompts (main task),
auxiliary alignment tasks and DPO pairs, split leak-free, as sharded parquet::

    <out>/sft/<split>/part-*.parquet    prompt, completion, task, user_id, target_ad_id, template
    <out>/dpo/<split>/part-*.parquet    prompt, chosen, rejected, pair_type, user_id,
                                        chosen_ad_id, rejected_ad_id, chosen_ecpm, rejected_ecpm
    <out>/eval/<split>/part-*.parquet   user_id, prompt, target_ad_id, target_sid,
                                        history_ad_ids, sequence_ad_ids
    <out>/skipped/part-*.parquet        user_id, reason, detail (users that yield nothing)
    <out>/manifest.json                 counts per split/task, config, sid_version, timings

``split`` is train | valid | test. The modules:

* ``contract.py``: names, schemas and layout of the output, and its one reader (:func:`read_split`).
* ``templates.py``: the prompt strings (data); ``render.py``: prompt text
  (:func:`build_user_prompt`, the one prompt used offline and by serving).
* ``catalog.py``: the ads the builder knows; ``examples.py``: one user's examples, DPO pairs
  and evaluation rows, in plain Python.
* ``pipeline.py``: the Ray Data job (:func:`run`; engine ``groupby``: shuffle by user, one call
  of ``build_user`` per user) and its single-process twin (:func:`build_local`);
  ``batch.py``: engine ``shards``, one task per user shard of the ingest output, no shuffle.

The pipeline names are imported on first use, so that reading the contract or building a
prompt does not import Ray Data.
"""

from importlib import import_module

from leadre.prompts.catalog import Catalog
from leadre.prompts.config import PromptConfig, trained_prompt_config
from leadre.prompts.contract import (DPO, EVAL, PAIR_TYPES, SFT, SKIPPED, SPLITS, TASKS,
                                     read_split)
from leadre.prompts.examples import SplitPlan, build_ad_rows, build_user, pick_template
from leadre.prompts.render import (Event, Prompt, approx_tokens, build_user_prompt,
                                   compose_prompt)

read_output = read_split  # the same reader under its older name

_PIPELINE = ("run", "build_local", "load_catalog", "make_plan")

__all__ = ["PromptConfig", "trained_prompt_config", "run", "build_local", "read_split",
           "read_output", "build_user_prompt", "compose_prompt", "build_user", "build_ad_rows",
           "approx_tokens", "pick_template", "load_catalog", "make_plan", "Catalog", "Event",
           "Prompt", "SplitPlan", "SFT", "DPO", "EVAL", "SKIPPED", "SPLITS", "TASKS", "PAIR_TYPES"]


def __getattr__(name: str):
    if name not in _PIPELINE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module("leadre.prompts.pipeline"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
