"""`python -m shine`: the same as the `shine` console script."""

from .cli import main

raise SystemExit(main())
