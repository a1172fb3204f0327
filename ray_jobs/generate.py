"""`ray job submit` entrypoint for `leadre generate` (same flags; see `--help`)."""

import sys

from leadre.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
