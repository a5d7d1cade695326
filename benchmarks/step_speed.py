"""Optimizer step speed on GPT-2-shaped parameters; see :mod:`shine.bench` (also ``shine bench``)."""
import sys

from shine.bench import main

if __name__ == "__main__":
    sys.exit(main())
