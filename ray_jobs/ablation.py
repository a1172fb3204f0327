"""`ray job submit -- python ray_jobs/ablation.py --ingest-dir ... --sids-dir ...`: the ablation
table (prompts -> sft -> dpo -> eval for main only, +aux, +cross-domain, +DPO)."""

import sys

from leadre.cli import main

sys.exit(main(["ablation", *sys.argv[1:]]))
