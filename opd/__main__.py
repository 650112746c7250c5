"""`python -m opd` is the `opd` command."""

from opd.cli import main

raise SystemExit(main())
