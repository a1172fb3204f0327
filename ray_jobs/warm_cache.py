"""Warm the serving candidate store for all active users with Ray Data.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/warm_cache.py --ingest-dir s3://.../ingest --sids-dir ... \
        --index-dir ... --model-dir ... --store-url redis://redis:6379/0 --workers 4 \
        --gpus-per-worker 1 --set ray.address=auto

Flags are the fields of ``leadre.serve.warm.WarmConfig`` (``--help``); ``--config FILE.yaml``
reads its ``warm_cache`` section; ``--set key=value`` overrides anything.
"""

import argparse
import json
import logging
import sys

from leadre.cli import _add_config_flags
from leadre.config import ConfigError, _merge, from_dict, parse_overrides, read_yaml
from leadre.serve.warm import WarmConfig, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="warm_cache.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="FILE.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_config_flags(p, WarmConfig)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        data = (read_yaml(args.config).get("warm_cache") or {}) if args.config else {}
        data = _merge(data, parse_overrides(args.overrides))
        flags = {k: v for k, v in vars(args).items() if k not in ("config", "overrides")}
        cfg = from_dict(WarmConfig, _merge(data, flags))
        out = run(cfg)
    except ConfigError as e:
        print(f"warm_cache: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
