"""The pipeline's stages, once: what each is called, where its code and config live, and
which upstream artifact directory each of its inputs reads.

The CLI builds its sub-commands from :data:`STAGES`, the demo runs them in order under one
directory, and the ablation runner wires its variants with :func:`wire`. Stage modules are
imported only when a stage's config or ``run`` is needed: torch, transformers and Ray are
slow to import, and ``leadre --help`` must not pay for them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Any, Mapping

from leadre.config import from_dict, merge


@dataclass(frozen=True)
class Input:
    """A config option holding an upstream artifact directory: ``option`` reads the output
    of the first stage in ``sources`` that the wiring knows a directory for. With
    ``recorded_by``, an unset ``option`` is the directory that the artifact in the option
    ``recorded_by`` names under the same key in its manifest (eval's ``sids_dir``: the one its
    prompts were built from); ``required`` says whether it may stay unset."""

    option: str
    sources: tuple[str, ...]
    recorded_by: str | None = None
    required: bool = True


@dataclass(frozen=True)
class Stage:
    name: str  # the sub-command
    module: str  # exports ``run(cfg) -> dict``
    config: str  # ``module:Class`` of the config: ``<package>.config`` beside the stage
    help: str
    section: str  # the YAML section this stage reads
    inputs: tuple[Input, ...] = ()
    artifact: str | None = None  # directory name under a pipeline root; None: the stage's name
    json_result: bool = True  # the CLI prints the result's summary as JSON (the demo: its own)
    # The CLI keeps library output in a log file unless --verbose. Not the demo (its own
    # console) nor serve (a service: its output is its operator's log).
    quiet: bool = True

    @property
    def dir_name(self) -> str:
        return self.artifact or self.name


def _in(option: str, *sources: str) -> Input:
    return Input(option, sources)


def _recorded(option: str, by: str, *sources: str, required: bool = True) -> Input:
    return Input(option, sources, recorded_by=by, required=required)


# Pipeline order.
STAGES: tuple[Stage, ...] = (
    Stage("generate", "leadre.data.synth", "leadre.data.config:SynthConfig",
          "generate the synthetic ad world (ads, users, events as parquet)", "synth",
          artifact="world"),
    Stage("ingest", "leadre.data.ingest", "leadre.data.config:IngestConfig",
          "validate raw logs with Ray Data; write clean tables, quarantine and manifest", "ingest",
          inputs=(_in("input_dir", "generate"),)),
    Stage("sids", "leadre.sids", "leadre.sids.config:SidConfig",
          "embed ads, train RQ-VAE/RQ-KMeans, write the unique S-ID table, codebooks and trie",
          "sids", inputs=(_in("ingest_dir", "ingest"),)),
    Stage("prompts", "leadre.prompts", "leadre.prompts.config:PromptConfig",
          "build intent-aware prompts, auxiliary tasks and DPO pairs (leak-free splits) "
          "with Ray Data", "prompts",
          inputs=(_in("ingest_dir", "ingest"), _in("sids_dir", "sids"))),
    # Not wired into sft: a pipeline builds its model from scratch unless base_model is set.
    Stage("base-model", "leadre.train.base_models", "leadre.train.config:BaseModelConfig",
          "prepare a pretrained base model from the GGUF of an installed model package (sha256 "
          "check, dequantise, safetensors + tokenizer) for `leadre sft --base-model DIR`",
          "base_model", artifact="base_model"),
    # sft's own sids_dir defaults to the one the prompts stage recorded, so it is not wired.
    Stage("sft", "leadre.train.sft", "leadre.train.config:SftConfig",
          "LoRA SFT of a causal LM on the prompts (Ray Train + TRL SFTTrainer + PEFT): "
          "checkpoints, resume, adapter and merged model", "sft",
          inputs=(_in("prompts_dir", "prompts"), _recorded("sids_dir", "prompts_dir"))),
    Stage("dpo", "leadre.train.dpo", "leadre.train.config:DpoConfig",
          "DPO from the SFT adapter on eCPM preference pairs (Ray Train + TRL DPOTrainer)", "dpo",
          inputs=(_in("prompts_dir", "prompts"), _in("sft_dir", "sft"))),
    Stage("eval", "leadre.eval.evaluate", "leadre.eval.config:EvalConfig",
          "trie-constrained beam search for every eval user (Ray Data), metrics, baselines, "
          "report (JSON, Markdown, PNG)", "eval",
          inputs=(_in("prompts_dir", "prompts"), _in("model_dir", "dpo", "sft"),
                  _recorded("sids_dir", "prompts_dir", "sids"),
                  _recorded("ingest_dir", "prompts_dir", "ingest", required=False))),
    Stage("ablation", "leadre.eval.ablation", "leadre.eval.config:AblationConfig",
          "paper-style ablation table, equal step budget: main only, +aux, +cross-domain, "
          "+knowledge tokens, +DPO "
          "(drives prompts -> sft -> dpo -> eval)", "ablation",
          inputs=(_in("ingest_dir", "ingest"), _in("sids_dir", "sids"))),
    Stage("index", "leadre.index", "leadre.index.config:IndexConfig",
          "build the ScaNN index over the active ads' embeddings (recall@10 vs exact search)",
          "index", inputs=(_in("sids_dir", "sids"), _in("ingest_dir", "ingest"))),
    Stage("add-ads", "leadre.index.add_ads", "leadre.index.config:AddAdsConfig",
          "add new ads without retraining: S-IDs from the frozen encoder + trained quantiser "
          "(same S-ID version), appended to the S-ID table, and a new index version", "add_ads",
          inputs=(_in("sids_dir", "sids"), _in("index_dir", "index"))),
    Stage("warm", "leadre.serve.warm", "leadre.serve.config:WarmConfig",
          "fill the candidate store for all active users in bulk (Ray Data + generator actors)",
          "warm", inputs=(_in("ingest_dir", "ingest"), _in("sids_dir", "sids"),
                          _in("index_dir", "index"), _in("model_dir", "dpo", "sft"))),
    Stage("serve", "leadre.serve", "leadre.serve.config:ServeConfig",
          "run the two-tier Ray Serve graph (ScaNN matcher as the HTTP ingress, LLM generator)",
          "serve", inputs=(_in("index_dir", "index"), _in("sids_dir", "sids"),
                           _in("model_dir", "dpo", "sft")), quiet=False),
    Stage("demo", "leadre.demo", "leadre.demo:DemoConfig",
          "run the whole pipeline on the embedded synthetic world and print a summary", "demo",
          json_result=False, quiet=False),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}

# The packages of ``leadre/`` in pipeline order: a package imports only its own modules,
# earlier packages and the shared top-level modules (``artifacts``, ``config``, ``runtime``,
# ...), never a later package (``tests/test_layers.py`` holds every import to this). ``model``
# is the layer every stage that loads or runs the LM shares.
LAYERS: tuple[str, ...] = ("data", "sids", "prompts", "model", "train", "eval", "index",
                           "serve")


def layer_of(module: str) -> int | None:
    """Position in :data:`LAYERS` of the package of ``module`` (``leadre.train.sft`` -> 4);
    None for the top-level modules, which belong to no stage."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(BY_NAME)}") from None


def config_class(name: str) -> type:
    """The config dataclass of stage ``name`` (imports the stage's module)."""
    module, cls = stage(name).config.split(":")
    return getattr(importlib.import_module(module), cls)


def run_stage(name: str, cfg: Any) -> dict[str, Any]:
    """Run stage ``name`` on its config; returns the stage's manifest."""
    return importlib.import_module(stage(name).module).run(cfg)


def pipeline_dirs(root: str, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """``{stage: <root>/<its directory>}`` for the stages a pipeline run writes."""
    chosen = [stage(n) for n in names] if names else STAGES
    return {s.name: f"{root.rstrip('/')}/{s.dir_name}" for s in chosen}


def recorded_input(artifact_dir: str, option: str) -> str | None:
    """The input directory ``option`` that the stage which wrote ``artifact_dir`` recorded in
    its manifest (under ``inputs``, else ``config``); None when it recorded none."""
    from leadre.artifacts import read_manifest

    manifest = read_manifest(artifact_dir)
    for section in ("inputs", "config"):
        value = (manifest.get(section) or {}).get(option)
        if isinstance(value, str) and value:
            return value
    return None


def resolve_inputs(name: str, cfg: Any) -> Any:
    """``cfg`` with each unset input directory of stage ``name`` filled in from the upstream
    artifact that recorded it (:attr:`Input.recorded_by`); the one place a stage finds its
    inputs. Raises :class:`~leadre.artifacts.ArtifactError` naming the option when a
    required one stays unset."""
    from leadre.artifacts import ArtifactError

    for inp in stage(name).inputs:
        if inp.recorded_by is None or getattr(cfg, inp.option) is not None:
            continue
        source = getattr(cfg, inp.recorded_by)
        value = recorded_input(source, inp.option)
        if value is None and inp.required:
            raise ArtifactError(f"{source}/manifest.json does not name its {inp.option}; "
                                f"pass {inp.option}=<its directory>")
        setattr(cfg, inp.option, value)
    return cfg


def wired_options(name: str, dirs: Mapping[str, str]) -> dict[str, str]:
    """The input-directory options of stage ``name`` that ``dirs`` (``{stage: directory}``)
    can fill, plus ``out`` when ``dirs`` names the stage's own directory."""
    s = stage(name)
    opts: dict[str, str] = {}
    for inp in s.inputs:
        source = next((src for src in inp.sources if src in dirs), None)
        if source is not None:
            opts[inp.option] = dirs[source]
    if name in dirs:
        opts["out"] = dirs[name]
    return opts


def wire(name: str, dirs: str | Mapping[str, str],
         settings: Mapping[str, Any] | None = None) -> Any:
    """Stage ``name``'s config: defaults <- ``settings`` <- its input directories pointing at
    the upstream outputs in ``dirs`` (a pipeline root, or ``{stage: directory}``; inputs
    whose upstream is absent keep their value from ``settings`` or the default). The wired
    directories win: a pipeline step must read its own upstream outputs, whatever a shared
    YAML section says."""
    dirs = pipeline_dirs(dirs) if isinstance(dirs, str) else dirs
    cls = config_class(name)
    opts = wired_options(name, dirs)
    if "out" in opts and "out" not in {f.name for f in fields(cls)}:
        del opts["out"]  # warm and serve write to a store / serve, not a directory
    return from_dict(cls, merge(dict(settings or {}), opts))
