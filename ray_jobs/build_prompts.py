"""`ray job submit` entrypoint for `leadre prompts` (same flags; see `--help`)."""

import sys

from leadre.cli import main

if __name__ == "__main__":
    sys.exit(main(["prompts", *sys.argv[1:]]))
