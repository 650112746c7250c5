"""`opd train` / `python -m student_trainer`: train the student (one process, or one per rank under torchrun).

torchrun --nproc-per-node 8 -m student_trainer --config deploy/presets/train-gpu.yaml
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Sequence

from opd.config import ConfigError, load_config
from opd.logs import setup_logging
from student_trainer.config import TrainerConfig

log = logging.getLogger("student_trainer")
DESCRIPTION = (
    "Train a student on its own rollouts (from Redis) against the teacher service's scores, with "
    "FSDP2 and chunked divergence losses; publish weights for the rollout workers. Options come from "
    "--config YAML < OPD_TRAIN__* env < flags. Launch with torchrun for several processes."
)


def _progress(trainer, stats: dict[str, float]) -> None:
    s = trainer.status
    print(
        f"step {s.step}/{s.max_steps}  loss {stats.get('loss', float('nan')):+.4f}  "
        f"kl {stats.get('mean_divergence', float('nan')):.4f}  tok/s {s.tokens_per_s:,.0f}  "
        f"teacher wait {stats['teacher_wait_s']:.2f}s  data wait {stats['data_wait_s']:.2f}s  "
        f"compute {stats['compute_s']:.2f}s  tokens {stats.get('tokens', 0):.0f}  v{s.policy_version}",
        flush=True,
    )


def run(config: TrainerConfig) -> int:
    from opd.loop_thread import LoopThread
    from student_trainer.model import init_distributed
    from student_trainer.runtime import TrainerRuntime

    info = init_distributed(config.dist)
    io = LoopThread("trainer-io")
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    runtime = TrainerRuntime(config, info, io)
    try:
        runtime.start()
        trainer = runtime.trainer
        while trainer.step_no < config.max_steps and not stop["requested"]:
            stats = trainer.step()
            runtime.after_step()
            if info.is_main:
                _progress(trainer, stats)
        if stop["requested"] and trainer.step_no % config.checkpoint.every_steps:
            log.info("SIGTERM: checkpointing step %d before exit", trainer.step_no)
            trainer.checkpoint()
        else:
            runtime.finish()
    finally:
        runtime.close()
        io.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(TrainerConfig, argv, prog="opd train", description=DESCRIPTION, env_prefix="OPD_TRAIN__")
    except ConfigError as exc:
        print(f"opd train: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    from student_trainer.score_source import TeacherMismatch

    started = time.time()
    try:
        code = run(config)
    except (ConfigError, ValueError, TeacherMismatch) as exc:
        print(f"opd train: {exc}", file=sys.stderr)
        return 2
    log.info("done in %.0f s", time.time() - started)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
