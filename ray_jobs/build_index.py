"""`ray job submit` entrypoint for `leadre index` (same flags; see `--help`)."""

import sys

from leadre.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
