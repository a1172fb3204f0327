"""`ray job submit` entrypoint for `leadre serve` (same flags; see `--help`). In a job, pass
`--no-blocking` to deploy and return; the app keeps running on the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/serve.py --index-dir /data/index --sids-dir /data/sids \
        --model-dir /data/dpo --store-url redis://redis:6379/0 --host 0.0.0.0 --no-blocking
"""

import sys

from leadre.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
