"""`python -m llamaherd ...` is `herd ...` (and `torchrun ... -m llamaherd pretrain ...` starts it on every rank)."""

import sys

from llamaherd.cli import main

if __name__ == "__main__":
    sys.exit(main())
