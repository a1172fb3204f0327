"""`ray job submit` entrypoint for `leadre add-ads` (same flags; see `--help`)."""

import sys

from leadre.cli import main

if __name__ == "__main__":
    sys.exit(main(["add-ads", *sys.argv[1:]]))
