"""`ray job submit` entrypoint for `leadre warm`: warm the serving candidate store for all
active users with Ray Data (same flags; see `--help`).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/warm_cache.py --ingest-dir s3://.../ingest --sids-dir ... \
        --index-dir ... --model-dir ... --store-url redis://redis:6379/0 --generation.num-replicas 4 \
        --generation.num-gpus 1
"""

import sys

from leadre.cli import main

if __name__ == "__main__":
    sys.exit(main(["warm", *sys.argv[1:]]))
