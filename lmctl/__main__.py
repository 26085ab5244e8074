"""`python -m lmctl` is the same program as the `lmctl` console script."""

from lmctl.cli import main

raise SystemExit(main())
