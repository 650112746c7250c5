"""The end of every fault test: the run finishes, its accounts balance, no process hangs, the figures are kept."""

from __future__ import annotations

from tests.fixtures.faults import Pipeline, PipelineProcess, wait_for
from tests.fixtures.run_audit import (
    Accounts,
    audit_lines,
    effective_steps,
    first_step_after,
    last_step,
    record_fault,
    redis_leftovers,
)

RUN_TIMEOUT_S = 420  # the rest of a tiny run after a fault; a hang is what fails here, not slowness
STOP_GRACE_S = 30  # SIGTERM -> exit for the teacher and workers at the end (drain graces are 5-10 s)


def wait_step(
    pipeline: Pipeline, trainer: PipelineProcess, step: int, timeout_s: float = RUN_TIMEOUT_S, poll_s: float = 0.2
) -> int:
    """Wait until steps.jsonl shows `step` trained; returns the last step seen."""
    ckpt = pipeline.checkpoint_dir
    wait_for(lambda: last_step(ckpt) >= step or not trainer.alive(), timeout_s, f"step {step}", poll_s=poll_s)
    assert trainer.alive(), f"the trainer exited before step {step}\n{pipeline.tails()}"
    return last_step(ckpt)


def finish(
    pipeline: Pipeline, trainer: PipelineProcess, fault: str, fault_at: float, back_at: float, **figures: object
) -> Accounts:
    """Wait for the trainer to end the run, check the accounts, stop the rest, and record the figures:
    `recovery_s` is fault -> the first step trained after the faulted part was back (`back_at`)."""
    code = trainer.wait(RUN_TIMEOUT_S)
    assert code is not None, f"the trainer hung: still running {RUN_TIMEOUT_S} s after the fault\n{pipeline.tails()}"
    assert code == 0, f"the trainer exited with {code}\n{pipeline.tails()}"
    stopped = pipeline.close(STOP_GRACE_S, keep=[pipeline.redis.process])  # Redis stays for the leftovers
    client = pipeline.redis.client()
    try:
        leftovers = redis_leftovers(client, pipeline.namespace)
    finally:
        client.close()
    pipeline.tap.stop()
    accounts = Accounts.read(
        pipeline.checkpoint_dir, pipeline.prompt_file, pipeline.run.samples, pipeline.tap.fed, leftovers
    )
    problems = accounts.problems(pipeline.run.max_steps)
    assert not problems, "\n".join(problems) + "\n" + pipeline.tails()
    hung = [name for name, (_, by_sigterm) in stopped.items() if not by_sigterm]
    assert not hung, f"{hung} needed SIGKILL {STOP_GRACE_S} s after SIGTERM\n{pipeline.tails()}"
    lines = audit_lines(pipeline.checkpoint_dir)
    figures.update(
        recovery_s=next_step_s(pipeline, back_at, fault_at),
        back_s=round(back_at - fault_at, 2),
        steps_during_fault=sum(fault_at < line["time"] <= back_at for line in lines),
        steps_retrained=len(lines) - len(accounts.steps),  # steps a dead run trained but never committed
        stale_dropped=sum(line.get("dropped_stale") or 0 for line in lines),
        empty_steps=sum(not line["rollouts"] for line in effective_steps(lines)),  # every group dropped as stale
        **accounts.figures(),
    )
    record_fault(fault, figures)
    return accounts


def next_step_s(pipeline: Pipeline, since: float, fault_at: float) -> float | None:
    """Seconds from `fault_at` to the first step trained after `since` (None if none)."""
    line = first_step_after(pipeline.checkpoint_dir, since)
    return None if line is None else round(line["time"] - fault_at, 2)
