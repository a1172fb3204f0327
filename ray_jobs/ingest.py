"""`ray job submit` entrypoint for `leadre ingest` (same flags; see `--help`)."""

import sys

from leadre.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
