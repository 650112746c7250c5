"""`python -m opd_apps.score` = `opd score` (the command lives in `opd_apps.score.command`)."""

from opd_apps.score.command import main

if __name__ == "__main__":
    raise SystemExit(main())
