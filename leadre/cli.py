"""The ``leadre`` command: one sub-command per pipeline stage.

Every stage (listed once, in :mod:`leadre.stages`) is declared the same way: a config
dataclass whose fields carry ``metadata={"help": ...}`` and a ``run(cfg) -> dict`` function.
The CLI turns each field into a ``--flag``, accepts ``--config FILE.yaml`` (the stage's section
of it) and ``--set key=value`` overrides, so the command line, the YAML files and ``ray job
submit`` all map onto the same typed object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import traceback
import typing
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin, get_type_hints

from leadre.artifacts import ArtifactError
from leadre.config import RENAMED, ConfigError, load_config, merge, nest, parse_overrides
from leadre.console import ray_session_logs, stage_output
from leadre.runtime import RayConfig
from leadre.stages import STAGES, Stage, config_class, run_stage

__all__ = ["STAGES", "build_parser", "config_from_args", "main"]


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


def _nullable(conv: Callable[[str], Any]) -> Callable[[str], Any]:
    """`--model-dir null` means None, as the help texts and the YAML spelling say (argparse
    would otherwise pass the string "null" on)."""
    def parse(raw: str) -> Any:
        return None if raw == "null" else conv(raw)
    parse.__name__ = getattr(conv, "__name__", "value")  # argparse names it in its errors
    return parse


# Options every sub-command has; a config field of the same name is set through them.
COMMON_OPTIONS = {"config", "overrides", "verbose"}
VERBOSE_HELP = ("the libraries' output (Ray and its workers, HF, warnings) here, not in "
                "<out>/../logs/<stage>.log, and the project's debug lines (demo: the "
                "libraries' logs as they happen)")


def _add_config_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """A flag per field; a nested section's fields get ``--<section>.<field>`` flags
    (``--generation.beam-size 20``, ``--ray.address auto``)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or (not prefix and f.name in COMMON_OPTIONS):
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            _add_config_flags(parser, tp, f"{prefix}{f.name}.")
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = prefix + f.name
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_ = f.metadata.get("help", "")
        if tp is bool or tp == (bool | None):
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{help_} (default: {default})")
            continue
        conv, choices, optional = _scalar_type(tp)
        if conv is None:
            continue
        if optional:
            conv = _nullable(conv)
        parser.add_argument(flag, dest=dest, type=conv, choices=choices,
                            default=argparse.SUPPRESS,
                            metavar=None if choices else f.name.upper(),
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
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage.name, help=stage.help,
                           description=stage.help[:1].upper() + stage.help[1:] + ".")
        p.add_argument("--config", metavar="FILE.yaml",
                       help=f"YAML file; the '{stage.section}' section configures this stage")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config field (repeatable); VALUE is parsed as YAML")
        cls = config_class(stage.name) if stage.name == chosen else None
        own = {f.name: f for f in dataclasses.fields(cls)}.get("verbose") if cls else None
        # Also after the stage name (`leadre demo -v`); SUPPRESS keeps a `-v` given before it.
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help=own.metadata.get("help", VERBOSE_HELP) if own else VERBOSE_HELP)
        p.set_defaults(_stage=stage)
        if cls is not None:
            _add_config_flags(p, cls)
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    """Defaults <- the stage's section of ``--config`` <- ``--set`` overrides <- flags."""
    stage: Stage = args._stage
    cls = config_class(stage.name)
    reserved = COMMON_OPTIONS | {"_stage", "stage"}
    flags = nest({k: v for k, v in vars(args).items() if k not in reserved})
    if args.verbose and _has_verbose(cls):
        flags["verbose"] = True
    return load_config(cls, args.config, section=stage.section,
                       overrides=merge(parse_overrides(args.overrides), flags))


def _has_verbose(cls: type) -> bool:
    """A stage with its own ``verbose`` option (the demo) gets ``-v`` instead of debug
    logging."""
    return any(f.name == "verbose" for f in dataclasses.fields(cls))


def _renamed_flag(unknown: list[str]) -> str | None:
    """A message for a flag the stage does not know but an earlier release did
    (``--prompts``, ``--beam-size``), which argparse would only call unrecognised."""
    for arg in unknown:
        old = arg.split("=", 1)[0]
        if old.startswith("--") and old[2:].replace("-", "_") in RENAMED:
            new = "--" + RENAMED[old[2:].replace("-", "_")].replace("_", "-")
            return f"leadre: error: {old} is now called {new}"
    return None


def log_file(stage: Stage, cfg: Any) -> Path:
    """Where a quiet run keeps the libraries' output: ``<parent of out>/logs/<stage>.log``,
    beside the stage's artifact directory, not in it (a stage may clear that), and where
    `leadre demo` keeps its stage logs; ``runs/logs/`` for a stage without a local ``out``."""
    out = getattr(cfg, "out", None)
    local = isinstance(out, str) and "://" not in out
    root = Path(out).resolve().parent if local else Path("runs").resolve()
    return root / "logs" / f"{stage.name}.log"


def _run_quietly(stage: Stage, cfg: Any, argv: list[str], path: Path) -> dict[str, Any]:
    """``run_stage`` with only the project's log lines on the terminal; everything else,
    a failure's traceback included, goes to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"leadre {' '.join(argv)}  ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    with stage_output(path) as console:
        console.print(f"library logs: {path} (--verbose prints them here)")
        try:
            return run_stage(stage.name, cfg)
        except Exception:
            traceback.print_exc()
            raise
        finally:
            # where the workers' output is (with ray.quiet, only there)
            workers = ray_session_logs()
            if workers is not None:
                print(f"Ray workers' logs: {workers}", file=sys.stderr)


def _one_line(e: BaseException) -> str:
    """An exception in one line: its last one, where a Ray error wrapping a worker's
    traceback names the worker's exception."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1].strip()}" if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        renamed = _renamed_flag(unknown)
        if renamed:
            print(renamed, file=sys.stderr)
            return 2
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    stage: Stage = args._stage
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose and not _has_verbose(config_class(stage.name)):
        # the project's debug lines; the libraries' stay at INFO (matplotlib alone logs a
        # DEBUG line per installed font)
        logging.getLogger("leadre").setLevel(logging.DEBUG)
    quiet = stage.quiet and not args.verbose
    path: Path | None = None
    try:
        cfg = config_from_args(args)
        ray_cfg = getattr(cfg, "ray", None)
        if isinstance(ray_cfg, RayConfig) and ray_cfg.quiet is None:
            ray_cfg.quiet = quiet
        if quiet:
            path = log_file(stage, cfg)
            result = _run_quietly(stage, cfg, argv, path)
        else:
            result = run_stage(stage.name, cfg)
    except (ConfigError, ArtifactError, FileNotFoundError) as e:
        print(f"leadre {stage.name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if path is None:  # not quiet: the traceback as usual
            raise
        print(f"leadre {stage.name}: error: {_one_line(e)} (traceback: {path})",
              file=sys.stderr)
        return 1
    if result is not None and stage.json_result:
        print(json.dumps(result.get("summary", result), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
