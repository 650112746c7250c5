"""`opd teacher` / `python -m teacher_server`: serve a teacher model over gRPC."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from opd.config import ConfigError, load_config
from opd.logs import setup_logging
from teacher_server.config import TeacherConfig

DESCRIPTION = (
    "Serve a teacher model's per-token log-probs (actual token, top-k, tail mass, optionally the full "
    "vocabulary) over gRPC on --grpc-port, with metrics, health, /v1/info and a JSON /v1/score on "
    "--ops-port. Options come from --config YAML < OPD_TEACHER__* env < flags."
)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(
            TeacherConfig, argv, prog="opd teacher", description=DESCRIPTION, env_prefix="OPD_TEACHER__"
        )
        setup_logging(config.log_level)
        from teacher_server.server import TeacherServer

        asyncio.run(TeacherServer(config).serve_forever())
    except ConfigError as exc:
        print(f"opd teacher: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
