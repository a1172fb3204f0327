"""`ray job submit` entrypoint for `leadre sft` (same flags; see `--help`)."""

import sys

from leadre.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
