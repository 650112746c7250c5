"""Evaluation rounds on held-out prompts, each of one policy version: fed through the prompt stream, never trained on.

Every `eval.every_steps` steps (and once before the first) rank 0 runs a round of the policy version it has
published last, V: it feeds the eval prompts (ids tagged `@eval{round}`), and training pauses until the round's
samples are in, so no newer version is announced meanwhile. Every sample must come from V: a group with a
sample of another version (a worker that had not loaded V yet) is rejected and its prompt fed again (tag
`@eval{round}.{attempt}`). When every prompt has a group of V, their teacher scores are fetched and the round is
reported: pass@1 (share of the samples with a reward whose reward > loss.pass_threshold), mean reward (mean@k
over the group), samples without a reward (`rewards_missing`), the per-token sampled reverse KL to the teacher,
mean(log p_S(y) - log p_T(y)) with the student's log-probs taken at sampling time (the behaviour log-probs; exact
for sampling temperature 1), both floored as everywhere (`student_trainer.evaluation.sampled_reverse_kl`), the
teacher-token diagnostics (`student_trainer.evaluation.teacher_diagnostics`: teacher entropy over
top-k + tail, a lower bound; p_T of the sampled token; share inside the teacher's top-k), the tool episodes'
token and turn counts, `policy_version` V and `rejected_samples`. A round
gives up (reported with `complete: false` and the reason) after `eval.round_timeout_s`, or at once when
`{ns}:policy` announces a version newer than V (left by an earlier run: workers will not sample V again).

Owns `EvalRounds` (rank 0): the round, what it needs passed in (the rollout source, the score source, a waiter
that logs and honours stop requests), the report, and `evals.jsonl` beside the checkpoints. The rollouts of a
round, accepted or rejected, are handed to `mark_used` (acknowledged with the next committed checkpoint) and a
complete report to `report` (the trainer's status page, metrics and step log).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from opd.loop_thread import LoopThread
from opd.stream_consumer import sample_key
from protos.records import PromptRecord, RolloutRecord
from student_trainer.diagnostics import record_teacher_sums, tool_stats
from student_trainer.evaluation import TEACHER_KEYS, TokenSums, sampled_reverse_kl
from student_trainer.groups.source import RolloutSource
from student_trainer.score_sources.base import ScoreSource
from student_trainer.waits import Waiter

log = logging.getLogger(__name__)
_TAG = "@eval"


def eval_report(records: list[RolloutRecord], scores: dict, pass_threshold: float = 0.0) -> dict[str, float]:
    """pass@1, mean reward, the per-token sampled reverse KL and the teacher-token diagnostics of one round's
    rollouts (`student_trainer.evaluation`: the sampled reverse KL with its log-prob floor; teacher entropy over
    top-k + tail, a lower bound; p_T of the sampled token; share inside the teacher's top-k), its tool episodes,
    and the samples without a reward (left out of pass@1 and the mean). Rollouts without scores (no teacher:
    `teacher.enabled=false`) have no divergence."""
    rewards = [r.reward for r in records if r.reward is not None]
    sums = TokenSums()
    for r in records:
        if r.rollout_id not in scores:
            continue
        mask = r.response_mask.astype(bool)
        rkl = sampled_reverse_kl(r.behaviour_logprobs[mask], scores[r.rollout_id].token_logprobs[mask])
        sums.add("divergence", rkl)
        if r.teacher is not None:  # several teachers: each domain's divergence to its own teacher
            sums.add(f"divergence/{r.teacher}", rkl)
        sums.merge(record_teacher_sums(r, scores[r.rollout_id]))
    report = {
        "samples": float(len(records)),
        "pass_at_1": float(np.mean([x > pass_threshold for x in rewards])) if rewards else math.nan,
        "mean_reward": float(np.mean(rewards)) if rewards else math.nan,
        "rewards_missing": float(len(records) - len(rewards)),
        "divergence": sums.mean("divergence", math.nan),
        "tokens": float(sums.counts.get("divergence", 0)),
        **{key: sums.mean(key, math.nan) for key in TEACHER_KEYS},
        **tool_stats(records),
    }
    for domain in sorted({r.teacher for r in records if r.teacher is not None}):
        report[f"divergence/{domain}"] = sums.mean(f"divergence/{domain}", math.nan)
    return report


def parse_eval_id(prompt_id: str) -> tuple[str, int, int] | None:
    """`{base}@eval{round}[.{attempt}]` -> (base, round, attempt); None for an id without the tag."""
    base, tag, rest = prompt_id.rpartition(_TAG)
    round_, _, attempt = rest.partition(".")
    if not tag or not round_.isdigit() or (attempt and not attempt.isdigit()):
        return None
    return base, int(round_), int(attempt or 0)


@dataclasses.dataclass
class EvalRound:
    """One round: the version it names, each prompt's accepted group (by base prompt id), what was rejected."""

    round_id: int
    step: int
    version: int
    prompts: dict[str, PromptRecord]  # base prompt id -> record
    attempts: dict[str, int] = dataclasses.field(default_factory=dict)  # base prompt id -> current attempt
    partial: dict[str, list[RolloutRecord]] = dataclasses.field(default_factory=dict)  # tagged id -> samples
    accepted: dict[str, list[RolloutRecord]] = dataclasses.field(default_factory=dict)  # base id -> group
    rejected_samples: int = 0

    def tag(self, base: str) -> str:
        attempt = self.attempts.get(base, 0)
        return f"{base}{_TAG}{self.round_id}" + (f".{attempt}" if attempt else "")

    @property
    def complete(self) -> bool:
        return len(self.accepted) == len(self.prompts)

    @property
    def records(self) -> list[RolloutRecord]:
        return [r for group in self.accepted.values() for r in group]


class EvalRounds:
    """Rank 0's eval rounds: feed, collect samples of the round's version (others rejected), score, report."""

    def __init__(
        self,
        io: LoopThread,
        source: RolloutSource,
        scores: ScoreSource,
        prompts: list[PromptRecord],
        run_dir: str | Path,
        waiter: Waiter,
        *,
        timeout_s: float,
        mark_used: Callable[[Iterable[str]], None],
        report: Callable[[int, dict], None],
        pass_threshold: float = 0.0,
    ) -> None:
        """`pass_threshold`: a reward above it is correct (pass@1); the trainer passes loss.pass_threshold."""
        self._io, self._source, self._scores, self._waiter = io, source, scores, waiter
        self._prompts, self._path = prompts, Path(run_dir) / "evals.jsonl"
        self._timeout_s = timeout_s
        self._mark_used, self._report = mark_used, report
        self._pass_threshold = pass_threshold

    def run(self, step: int, version: int) -> dict | None:
        """One round of policy `version` (published at or before `step`; round id = step), to its end: the
        report, or None when it gave up. Blocks (training waits); StopRequested on a stop request."""
        rnd = EvalRound(step, step, version, {r.prompt_id: r for r in self._prompts})
        self._feed(rnd, list(rnd.prompts))
        failure = self._collect(rnd)
        if failure is None:
            scores = self._waiter.result(
                self._scores.fetch(rnd.records), f"teacher scores of eval round {rnd.round_id} ({len(rnd.records)})"
            )
            report = {
                "step": step,
                "policy_version": version,
                **eval_report(rnd.records, scores, self._pass_threshold),
                "rejected_samples": float(rnd.rejected_samples),
            }
            self._write(report, rnd, complete=True)
            self._report(step, report)
            log.info("eval @ step %d: %s", step, {k: round(v, 4) for k, v in report.items()})
            return report
        self._write({"step": step, "policy_version": version, "samples": len(rnd.records)}, rnd, False, failure)
        log.warning("eval round of step %d (v%d) incomplete: %s", step, version, failure)
        return None

    def _feed(self, rnd: EvalRound, bases: list[str]) -> None:
        tagged = [dataclasses.replace(rnd.prompts[b], prompt_id=rnd.tag(b)) for b in bases]
        for i in range(0, len(tagged), 64):
            self._io.call(self._source.prompts.send_many([r.encode() for r in tagged[i : i + 64]]))

    def _collect(self, rnd: EvalRound) -> str | None:
        """Poll until every prompt has a group of the round's version; the reason when it gives up."""
        deadline, next_policy_check = time.monotonic() + self._timeout_s, 0.0
        ticker = self._waiter.ticker(lambda: self._waiting(rnd))
        while not rnd.complete:
            self._waiter.result(self._io.submit(self._source.poll()), lambda: self._waiting(rnd))
            self._take(rnd)
            ticker.tick()
            now = time.monotonic()
            if now >= deadline:
                return f"not all samples in within eval.round_timeout_s={self._timeout_s:g} s"
            if now >= next_policy_check:
                next_policy_check = now + 2.0
                announced = self._waiter.result(self._io.submit(self._source.announced_version()), "{ns}:policy")
                if announced is not None and announced > rnd.version:
                    return f"{{ns}}:policy announces v{announced}, newer than the round's v{rnd.version}"
        return None

    def _take(self, rnd: EvalRound) -> None:
        """Group the round's new samples by tagged prompt id; accept whole groups of its version, refeed others."""
        mine = self._source.take_eval(lambda pid: (p := parse_eval_id(pid)) is not None and p[1] == rnd.round_id)
        others = self._source.take_eval(lambda pid: True)  # samples of earlier rounds or unknown ids: not used
        self._mark_used(sample_key(r) for r in mine + others)
        refeed = []
        for record in mine:
            base, _, _ = parse_eval_id(record.prompt_id)  # type: ignore[misc]
            if base not in rnd.prompts or base in rnd.accepted or record.prompt_id != rnd.tag(base):
                continue  # an older attempt's sample
            group = rnd.partial.setdefault(record.prompt_id, [])
            group.append(record)
            if len(group) < record.group_size:
                continue
            del rnd.partial[record.prompt_id]
            if all(r.policy_version == rnd.version for r in group):
                rnd.accepted[base] = group
            else:
                rnd.rejected_samples += len(group)
                versions = sorted({r.policy_version for r in group})
                log.info(
                    "eval round %d: %s sampled at %s, not v%d: fed again", rnd.round_id, base, versions, rnd.version
                )
                rnd.attempts[base] = rnd.attempts.get(base, 0) + 1
                refeed.append(base)
        if refeed:
            self._feed(rnd, refeed)

    def _waiting(self, rnd: EvalRound) -> str:
        return (
            f"eval round of step {rnd.step} (v{rnd.version}): {len(rnd.accepted)} of {len(rnd.prompts)} prompts "
            f"sampled at v{rnd.version}, {rnd.rejected_samples} samples of other versions rejected"
        )

    def _write(self, report: dict, rnd: EvalRound, complete: bool, reason: str | None = None) -> None:
        """Append the round's report, its version and its samples' versions (checked: only the round's) to
        evals.jsonl."""
        versions = sorted({r.policy_version for r in rnd.records})
        assert versions in ([], [rnd.version]), versions  # only groups of the round's version are accepted
        self._path.parent.mkdir(parents=True, exist_ok=True)
        finite = {k: (v if v == v else None) for k, v in report.items()}  # NaN -> null
        line = {**finite, "time": time.time(), "policy_versions": versions, "complete": complete}
        line["rejected_samples"] = rnd.rejected_samples
        if reason:
            line["reason"] = reason
        with self._path.open("a") as f:
            f.write(json.dumps(line) + "\n")
