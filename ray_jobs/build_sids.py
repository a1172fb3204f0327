"""Stage 2 entrypoint for ``ray job submit -- python ray_jobs/build_sids.py --ingest-dir ...``."""

import sys

from leadre.cli import main

sys.exit(main(["sids", *sys.argv[1:]]))
