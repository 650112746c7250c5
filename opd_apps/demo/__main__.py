"""`python -m opd_apps.demo` = `opd demo` (the command lives in `opd_apps.demo.pipeline`)."""

from opd_apps.demo.pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
