"""`python -m diffalign ...` is the `diffalign` command (pipelines/cli.py, installed as diffalign.pipelines.cli)."""

import sys

from diffalign.pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main())
