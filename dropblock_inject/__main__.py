"""``python -m dropblock_inject``: the command line."""

from dropblock_inject.cli import main

raise SystemExit(main())
