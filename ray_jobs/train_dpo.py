"""`ray job submit` entrypoint for `leadre dpo` (same flags; see `--help`)."""

import sys

from leadre.cli import main

if __name__ == "__main__":
    sys.exit(main(["dpo", *sys.argv[1:]]))
