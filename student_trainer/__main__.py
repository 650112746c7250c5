"""`opd train` / `python -m student_trainer`: train the student (one process, or one per rank under torchrun).

torchrun --nproc-per-node 8 --shutdown-timeout 60 -m student_trainer --config deploy/presets/train-gpu.yaml

On SIGTERM (to any rank) every rank stops at the same step boundary, writes a final checkpoint of the steps
trained and exits 0 within `stop_grace_s`, or exits by force (code 3) when that runs out. `opd train` does not
launch torchrun: give torchrun `--shutdown-timeout` equal to `stop_grace_s` (how long it waits after forwarding
the signal before SIGKILL).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
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


def _progress(report, max_steps: int) -> None:
    """The step line on stdout, from the step's `StepReport`."""
    t = report.times
    print(
        f"step {report.step}/{max_steps}  loss {report.loss:+.4f}  "
        f"kl {report.get('mean_divergence'):.4f}  tok/s {report.tokens_per_s:,.0f}  "
        f"teacher wait {t.teacher_wait_s:.2f}s  data wait {t.data_wait_s:.2f}s  "
        f"compute {t.compute_s:.2f}s  tokens {report.tokens:.0f}  v{report.version}"
        f"{_diagnostics(report.measured())}",
        flush=True,
    )


def _diagnostics(stats: dict[str, float]) -> str:
    """The step line's recipe diagnostics: the teacher's entropy over top-k + tail (a lower bound, hence >=),
    p_T of the sampled token, share in the teacher's top-k, pass rate and missing rewards (when measured)."""
    parts = []
    for key, label in (
        ("teacher_entropy_topk_tail", "H_T>="),
        ("teacher_p_sampled", "p_T"),
        ("sampled_in_teacher_topk", "in_topk"),
        ("reference_kl", "kl_ref"),
        ("pass_rate", "pass"),
    ):
        value = stats.get(key)
        if value is not None and value == value:
            parts.append(f"{label} {value:.3f}")
    if stats.get("rewards_missing"):
        parts.append(f"no_reward {stats['rewards_missing']:.0f}")
    return "  " + "  ".join(parts) if parts else ""


def _on_sigterm(stop, grace_s: float) -> None:
    """SIGTERM: ask every wait to end (the loop then checkpoints and exits), and exit by force after `grace_s`.
    Only sets a flag and starts a thread: nothing here may block or take a lock the main thread holds."""
    if stop.requested_at is None:
        threading.Thread(target=_force_exit_after, args=(grace_s,), name="stop-grace", daemon=True).start()
    stop.request()


def _force_exit_after(grace_s: float) -> None:
    log.warning("SIGTERM: stopping (final checkpoint of the steps trained, then exit; forced exit in %.0f s)", grace_s)
    time.sleep(grace_s)
    log.error("still running %.0f s after SIGTERM (stop_grace_s): exiting now, without a final checkpoint", grace_s)
    logging.shutdown()
    os._exit(3)


def run(config: TrainerConfig) -> int:
    from opd.loop_thread import LoopThread
    from student_trainer.model import init_distributed
    from student_trainer.runtime import TrainerRuntime
    from student_trainer.waits import StopSignal

    info = init_distributed(config.dist)
    io = LoopThread("trainer-io")
    stop = StopSignal()
    signal.signal(signal.SIGTERM, lambda *_: _on_sigterm(stop, config.stop_grace_s))
    runtime = TrainerRuntime(config, info, io, stop=stop)
    try:
        runtime.start()
        trainer = runtime.trainer
        assert trainer is not None, "built by runtime.start()"
        while trainer.step_no < config.max_steps:
            report = trainer.step()
            if report is None:  # every rank agreed to stop
                break
            runtime.after_step()
            if info.is_main:
                _progress(report, config.max_steps)
        if trainer.stopped and trainer.step_no > trainer.last_checkpoint_step:
            log.info("stop requested: checkpointing step %d before exit", trainer.step_no)
            trainer.checkpoint()
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
    from student_trainer.score_sources.base import TeacherMismatch

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
