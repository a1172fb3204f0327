"""`ray job submit` entrypoint for `leadre base-model` (same flags; see `--help`)."""

import sys

from leadre.cli import main

if __name__ == "__main__":
    sys.exit(main(["base-model", *sys.argv[1:]]))
