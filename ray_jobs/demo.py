"""`ray job submit` entrypoint for `leadre demo` (same flags; see `--help`)."""

import sys

from leadre.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
