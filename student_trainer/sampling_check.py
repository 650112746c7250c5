"""That the rollouts were sampled the way the loss assumes: the worker's temperature and top-p vs the loss.

The loss takes the student's log-probs at `loss.student_temperature` over the
whole vocabulary, so it assumes rollouts sampled at that temperature with no
nucleus cut (top-p 1). A rollout record (schema >= 3) carries the worker's
`sampling_temperature` and `sampling_top_p`. `SamplingCheck.check` is called
on every step's groups (the same on every rank, so every rank raises
together) and, by default (`batch.sampling_mismatch=refuse`), raises
`SamplingMismatch` for the first rollout that disagrees, naming both values
and how to fix it. The trainer has not trained or acknowledged that rollout:
it stays pending in Redis, and a restarted trainer meets it again, so fix the
workers' sampling settings (and drain or trim the rollout stream) or allow
it (`warn`: logged once per distinct setting, then trained). A record that
does not carry them (schema 1-2, or offline scores) cannot be checked: said
once in the log, then trained.

Computes nothing of the loss; touches no Redis.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from protos.records import RolloutRecord

log = logging.getLogger(__name__)


class SamplingMismatch(ValueError):
    """A rollout was sampled with settings the loss does not assume; the message names both values."""


class SamplingCheck:
    """The loss's sampling assumptions, and what to do with a rollout that breaks them."""

    def __init__(self, student_temperature: float, policy: str = "refuse") -> None:
        self.temperature, self.policy = student_temperature, policy
        self._warned: set[tuple[float | None, float | None]] = set()

    def check(self, records: Iterable[RolloutRecord]) -> None:
        """Raise SamplingMismatch for the first record that disagrees (under `refuse`); else log once per setting."""
        for record in records:
            setting = (record.sampling_temperature, record.sampling_top_p)
            if setting in self._warned:
                continue
            problem = self.problem(record)
            if problem is None:
                continue
            if self.policy == "refuse" and record.sampling_temperature is not None:
                raise SamplingMismatch(problem)
            self._warned.add(setting)
            log.warning("%s", problem)

    def problem(self, record: RolloutRecord) -> str | None:
        """What is wrong with the record's sampling settings (None: nothing)."""
        temperature, top_p = record.sampling_temperature, record.sampling_top_p
        if temperature is None:
            return (
                f"rollout {record.rollout_id!r} does not say how it was sampled (a record of schema < 3, or "
                f"offline scores): its temperature cannot be checked against loss.student_temperature="
                f"{self.temperature:g}; trained as is"
            )
        same_t = math.isclose(temperature, self.temperature, rel_tol=1e-6)
        full_p = top_p is None or math.isclose(top_p, 1.0, rel_tol=1e-6)
        if same_t and full_p:
            return None
        return (
            f"rollout {record.rollout_id!r} was sampled at temperature {temperature:g} and top-p "
            f"{1.0 if top_p is None else top_p:g}, but the loss assumes temperature {self.temperature:g} "
            f"(loss.student_temperature) and top-p 1 (no nucleus cut): set the rollout workers' "
            f"--sampling-temperature {self.temperature:g} --sampling-top-p 1 (or loss.student_temperature="
            f"{temperature:g}), or set batch.sampling_mismatch=warn to train on it anyway; the rollout was not "
            f"trained nor acknowledged and stays in Redis"
        )
