"""`python -m opd_apps.eval` = `opd eval` (the command lives in `opd_apps.eval.command`)."""

from opd_apps.eval.command import main

if __name__ == "__main__":
    raise SystemExit(main())
