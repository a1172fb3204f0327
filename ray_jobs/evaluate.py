"""`ray job submit -- python ray_jobs/evaluate.py --config configs/x.yaml --set ...`: stage 6."""

import sys

from leadre.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
