"""The ``leadre`` command: one sub-command per pipeline stage.

Every stage is declared the same way: a config dataclass whose fields carry
``metadata={"help": ...}`` and a ``run(cfg) -> dict`` function. The CLI turns each field into
a ``--flag``, accepts ``--config FILE.yaml`` (the stage's section of it) and ``--set
key=value`` overrides, so the command line, the YAML files and ``ray job submit`` all map onto
the same typed object.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
import typing
from typing import Any, Callable, Literal, get_args, get_origin, get_type_hints

from leadre.config import ConfigError, from_dict, parse_overrides, read_yaml, _merge
from leadre.artifacts import ArtifactError


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    module: str
    config: str
    help: str
    section: str  # the YAML section this stage reads


# Pipeline order. Modules are imported only when their sub-command runs (torch/trl are slow).
STAGES: tuple[Stage, ...] = (
    Stage("generate", "leadre.synth", "SynthConfig",
          "generate the synthetic ad world (ads, users, events as parquet)", "synth"),
    Stage("ingest", "leadre.ingest", "IngestConfig",
          "validate raw logs with Ray Data; write clean tables, quarantine and manifest", "ingest"),
    Stage("sids", "leadre.sids", "SidConfig",
          "embed ads, train RQ-VAE/RQ-KMeans, write the unique S-ID table, codebooks and trie", "sids"),
    Stage("prompts", "leadre.prompts", "PromptConfig",
          "build intent-aware prompts, auxiliary tasks and DPO pairs (leak-free splits) "
          "with Ray Data", "prompts"),
    Stage("sft", "leadre.sft", "SftConfig",
          "LoRA SFT of a causal LM on the prompts (Ray Train + TRL SFTTrainer + PEFT): "
          "checkpoints, resume, adapter and merged model", "sft"),
    Stage("dpo", "leadre.dpo", "DpoConfig",
          "DPO from the SFT adapter on eCPM preference pairs (Ray Train + TRL DPOTrainer)", "dpo"),
    Stage("eval", "leadre.evaluate", "EvalConfig",
          "trie-constrained beam search for every eval user (Ray Data), metrics, baselines, "
          "report (JSON, Markdown, PNG)", "eval"),
    Stage("ablation", "leadre.ablation", "AblationConfig",
          "paper-style ablation table: main only, +aux, +cross-domain, +DPO "
          "(drives prompts -> sft -> dpo -> eval)", "ablation"),
    Stage("index", "leadre.index", "IndexConfig",
          "build the ScaNN index over the active ads' embeddings (recall@10 vs exact search)",
          "index"),
    Stage("warm", "leadre.serve.warm", "WarmConfig",
          "fill the candidate store for all active users in bulk (Ray Data + generator actors)",
          "warm"),
    Stage("serve", "leadre.serve", "ServeConfig",
          "run the two-tier Ray Serve graph (ingress, ScaNN matcher, LLM generator) over HTTP",
          "serve"),
    Stage("demo", "leadre.demo", "DemoConfig",
          "run the whole pipeline on the embedded synthetic world and print a summary", "demo"),
)


def _scalar_type(tp: Any) -> tuple[Callable[[str], Any] | None, list[Any] | None, bool]:
    """(argparse type, choices, optional) for a field annotation, or (None, ...) if the field
    is only settable through --set / YAML."""
    optional = False
    if get_origin(tp) in (typing.Union, __import__("types").UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        if len(args) != 1:
            return None, None, optional
        tp = args[0]
    if get_origin(tp) is Literal:
        return str, list(get_args(tp)), optional
    if tp is bool:
        return None, None, optional  # handled as --flag / --no-flag
    if tp in (int, float, str):
        return tp, None, optional
    return None, None, optional


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_ = f.metadata.get("help", "")
        if tp is bool or tp == (bool | None):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{help_} (default: {default})")
            continue
        conv, choices, _ = _scalar_type(tp)
        if conv is None:
            continue
        parser.add_argument(flag, dest=f.name, type=conv, choices=choices,
                            default=argparse.SUPPRESS, metavar=None if choices else f.name.upper(),
                            help=f"{help_} (default: {default})")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser. Only the stage named in ``argv`` gets its config flags (and so its
    module imported): `leadre --help` stays fast and one broken stage can't break the rest."""
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(
        prog="leadre",
        description="LEADRE on Ray: turn interaction logs into an LLM ad retrieval engine. "
                    "Each sub-command is one pipeline stage; each stage reads the previous "
                    "stage's artifact directory and writes its own, with a manifest.json.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help[:1].upper() + stage.help[1:] + ".")
        p.add_argument("--config", metavar="FILE.yaml",
                       help=f"YAML file; the '{stage.section}' section configures this stage")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config field (repeatable); VALUE is parsed as YAML")
        p.set_defaults(_stage=stage)
        if stage.name == chosen:
            _add_config_flags(p, getattr(importlib.import_module(stage.module), stage.config))
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    stage: Stage = args._stage
    cls = getattr(importlib.import_module(stage.module), stage.config)
    data: dict[str, Any] = {}
    if args.config:
        data = read_yaml(args.config).get(stage.section) or {}
    data = _merge(data, parse_overrides(args.overrides))
    reserved = {"config", "overrides", "_stage", "stage", "verbose"}
    flags = {k: v for k, v in vars(args).items() if k not in reserved}
    return from_dict(cls, _merge(data, flags))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        module = importlib.import_module(args._stage.module)
        result = module.run(cfg)
    except (ConfigError, ArtifactError, FileNotFoundError) as e:
        print(f"leadre {args._stage.name}: error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result.get("summary", result), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
