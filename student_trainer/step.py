"""One optimizer step on one rank's share of a batch: micro-batches, the step loss, backward, clip, AdamW.

Owns the arithmetic that makes N ranks x M micro-batches equal one big batch.
The step loss is defined once, over all ranks:

    L = sum_i s_i r_i l_i / D

(l_i a token's divergence term, or a sequence's mean under sequence_mean;
r_i the recipe's sample weight; s_i the staleness weight; D the unweighted
count of tokens or sequences, or 1 for sum). So that it holds however the
step is cut, the group-level quantities (reward-softmax and pass-rate
weights, GRPO advantages) are computed over the whole step's groups before
they are split, D is added up over every micro-batch of every rank (one
all-reduce) before the first backward, and each micro-batch's loss is its
own share of L (times the world size, because FSDP averages gradients over
ranks). Groups larger than the token budget are split by sequence
(`batching`). Every rank runs the same number of forward/backward passes
(FSDP's collectives), padding with two-token zero-weight fillers. Skips the
update when the gradient norm is not finite.

With `batch.mini_batches` k > 1 (`update`) a batch is trained as verl's PPO
mini-batches: each rank's share is cut into k parts of whole groups, and each
part is a step of its own in the sense above (its own L and D, clip, AdamW);
the group-level quantities are still computed over the whole batch first,
and the LR schedule steps once per batch.

Around the loss, per step: the sampling check (`SamplingCheck`, below: a
rollout sampled at another temperature than the loss's stops the run, by
default, before anything of the step is trained); the reference policy's
log-probs for GRPO's KL penalty (`reference`, when `loss.kl.coef` > 0), on the same
micro-batches; and the statistics beyond the loss (`diagnostics`: teacher
entropy over top-k + tail, p_T of the sampled token, share inside the top-k,
summed over micro-batches and ranks; rewards missing, pass rate and tool
episodes from the step's records, the same on every rank). Without a teacher
(`teacher.enabled=false`) the teacher-derived statistics are left out.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from protos.records import RolloutRecord
from student_trainer.batching import (
    MicroBatch,
    build_micro_batch,
    filler_record,
    pack_groups,
    placeholder_scores,
    reward_value,
    scores_to,
    split_by_sequences,
    teacher_scores_for,
    too_long_message,
    without_too_long,
)
from student_trainer.config import TrainerConfig
from student_trainer.diagnostics import TEACHER_KEYS, reward_stats, teacher_token_sums, tool_stats
from student_trainer.groups import Group
from student_trainer.loss.compute import TeacherTensors
from student_trainer.loss.planning import (
    Denominators,
    count_denominators,
    micro_batch_denominators,
    sequence_weights,
    step_denominators,
)
from student_trainer.loss.registry import TeacherNeed, teacher_needs
from student_trainer.model import DistInfo, StudentLoss, causal_lm

if TYPE_CHECKING:
    from student_trainer.reference import Reference

log = logging.getLogger(__name__)
_MEAN_KEYS = ("mean_divergence", "student_entropy", "top1_agreement", "fraction_kept", "reference_kl")
_TEACHER_STATS = ("mean_divergence", "top1_agreement")  # meaningless without a teacher (placeholder scores)


# Sample weights r and GRPO advantages by rollout id (None when unused): `StepRunner.group_terms`.
GroupTerms = tuple[dict[str, float] | None, dict[str, float] | None]


def split_mini_batches(mine: list[Group], k: int) -> list[list[Group]]:
    """A rank's share cut into `k` parts of whole groups, in its order, sizes differing by at most one group (the
    first parts the larger), as verl's `data.split(ppo_mini_batch_size)` cuts a rank's batch contiguously."""
    size, extra = divmod(len(mine), k)
    starts = [i * size + min(i, extra) for i in range(k + 1)]
    return [mine[starts[i] : starts[i + 1]] for i in range(k)]


class SamplingMismatch(ValueError):
    """A rollout was sampled with settings the loss does not assume; the message names both values."""


class SamplingCheck:
    """The loss's sampling assumptions, and what to do with a rollout that breaks them.

    The loss takes the student's log-probs at `loss.student_temperature` over the whole vocabulary, so it
    assumes rollouts sampled at that temperature with no nucleus cut (top-p 1); a rollout record (schema >= 3)
    carries the worker's `sampling_temperature` and `sampling_top_p`. `check` runs on every step's groups (the
    same on every rank, so every rank raises together) and, by default (`batch.sampling_mismatch=refuse`), raises
    `SamplingMismatch` for the first rollout that disagrees, naming both values and how to fix it. That rollout
    is neither trained nor acknowledged: it stays pending in Redis and a restarted trainer meets it again, so fix
    the workers' sampling settings (and drain or trim the stream) or allow it (`warn`: logged once per distinct
    setting, then trained). A record that does not carry them (schema 1-2, or offline scores) cannot be checked:
    said once in the log, then trained."""

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


class StepRunner:
    def __init__(
        self,
        root: StudentLoss,
        optimizer: torch.optim.Optimizer,
        scheduler,
        config: TrainerConfig,
        info: DistInfo,
        top_k: int,
        teacher_temperature: float,
        reference: Reference | None = None,
    ) -> None:
        """`reference`: the frozen initial student, needed when `loss.kl.coef` > 0 (`reference.build_reference`)."""
        self.root, self.optimizer, self.scheduler = root, optimizer, scheduler
        self.config, self.info = config, info
        self.top_k, self.temperature = top_k, teacher_temperature
        lm_config = root.lm.config
        self.max_model_len = int(getattr(lm_config, "max_position_embeddings", None) or 2**62)
        self.vocab_size = int(causal_lm(root.lm).get_output_embeddings().weight.shape[0])
        self.full_vocab = TeacherNeed.FULL in teacher_needs(config.loss)
        self.reference_mask = config.batch.attention == "mask"
        self.dropped_too_long = 0  # rollouts of the last step longer than the student's context
        if config.loss.kl.coef > 0 and reference is None:
            raise ValueError("loss.kl.coef > 0 needs the reference policy: pass reference=build_reference(...)")
        self.reference = reference
        self.has_teacher = config.teacher.enabled
        self.sampling = SamplingCheck(config.loss.student_temperature, config.batch.sampling_mismatch)

    def group_terms(self, groups: list[Group]) -> GroupTerms:
        """Sample weights r and GRPO advantages by rollout id, over the whole step's groups (None when unused).
        `groups` are every rank's (the batch-wide softmax and PACED's mean read them all); a missing reward is
        NaN here, never 0 (`weighting`)."""
        loss = self.config.loss
        records = [r for g in groups for r in g]
        if not records or not (loss.reward_softmax.enabled or loss.pass_rate.enabled or loss.rl_weight > 0):
            return None, None
        group_index = {g: i for i, g in enumerate(dict.fromkeys(r.group_id for r in records))}
        rewards_S = torch.tensor([reward_value(r) for r in records], dtype=torch.float64)
        group_ids_S = torch.tensor([group_index[r.group_id] for r in records])
        weights_S, advantages_S = sequence_weights(rewards_S, group_ids_S, loss)
        ids = [r.rollout_id for r in records]
        advantages = None if advantages_S is None else dict(zip(ids, advantages_S.tolist(), strict=True))
        return dict(zip(ids, weights_S.tolist(), strict=True)), advantages

    def batch_terms(self, groups: list[Group]) -> GroupTerms:
        """`group_terms` of every rank's groups as trained (a rollout too long for the student left out)."""
        trained, _ = without_too_long(groups, self.max_model_len)
        return self.group_terms(trained)

    def micro_batches(
        self, groups: list[Group], mine: list[Group], weights: dict[str, float], terms: GroupTerms | None = None
    ) -> list[MicroBatch]:
        """This rank's micro-batches of `mine`; every rank gets the same count, padded with two-token fillers. A
        rollout longer than the student's context is left out (logged as an error, counted in `dropped_too_long`).
        `terms`: `batch_terms(groups)`, when the caller already has them (one mini-batch of several)."""
        mine, too_long = without_too_long(mine, self.max_model_len)
        for record in too_long:  # a bad record is reported, never fatal (it would come back after a restart)
            log.error(too_long_message(record, self.max_model_len))
        self.dropped_too_long = len(too_long)
        sample_weights, advantages = terms if terms is not None else self.batch_terms(groups)
        batch = self.config.batch
        if batch.micro_batch_sequences:
            bins = split_by_sequences(mine, batch.micro_batch_sequences)
        else:
            bins = pack_groups(mine, batch.max_tokens_per_micro_batch)
        count = torch.tensor([len(bins)], device=self.info.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        micro = [
            build_micro_batch(
                b, weights, block_mask=self.reference_mask, sample_weights=sample_weights, advantages=advantages
            )
            for b in bins
        ]
        if len(micro) < int(count.item()):
            filler = filler_record(groups[0][0])
            fill = dataclasses.replace(build_micro_batch([[filler]], {filler.rollout_id: 0.0}), filler=True)
            micro += [fill] * (int(count.item()) - len(micro))
        return micro

    def denominators(self, micro: list[MicroBatch]) -> list[Denominators]:
        """Each micro-batch's D: the step's (every micro-batch's count, added over this rank, then over all
        ranks), or under `loss.reduction=micro_batch_mean` its own (`planning.micro_batch_denominators`)."""
        zero = Denominators(0.0, 0.0)
        counts = [zero if mb.filler else count_denominators(mb.inputs, self.config.loss) for mb in micro]
        total = sum(counts, zero)
        reduced = torch.tensor([total.distill, total.rl], dtype=torch.float64, device=self.info.device)
        dist.all_reduce(reduced)
        step_total = step_denominators(Denominators(*reduced.tolist()), self.config.loss)
        active = sum(not mb.filler for mb in micro)
        return micro_batch_denominators(counts, step_total, active, self.info.world_size, self.config.loss)

    def forward_backward(
        self, groups: list[Group], mine: list[Group], weights: dict[str, float], scores: dict, step: int
    ) -> dict[str, float]:
        """Accumulate the gradients of the step loss L over this rank's whole share (one mini-batch); returns
        step statistics summed over ranks (`loss` is L itself; the means are weighted by trained tokens)."""
        self.sampling.check([r for g in groups for r in g])  # every rank sees `groups`: all raise together
        sums = self._accumulate(groups, mine, weights, scores, step, self.batch_terms(groups))
        return self._batch_stats(groups, sums)

    def update(
        self, groups: list[Group], mine: list[Group], weights: dict[str, float], scores: dict, step: int
    ) -> tuple[dict[str, float], float]:
        """Train one batch: `batch.mini_batches` optimizer updates, as verl's PPO mini-batches (`update_policy`):
        this rank's share is cut into k parts of whole groups, in its order, and each part is its own step loss
        L, backward, clip and AdamW step. What is computed per batch stays per batch: the sample weights and
        GRPO advantages (over every group, before the cut), the behaviour log-probs of the PPO ratio (the
        records', so on parts 2..k the ratio measures how far the earlier updates moved the policy) and the LR
        schedule (one step per batch, after the last update, as verl's `update_actor`, if any update was
        applied). Returns the statistics (`loss`: the mean of the parts' L; tokens and means over the batch)
        and the gradient norm (the mean of the parts', before clipping; not finite if every update was skipped).
        With k = 1 this is `forward_backward` then `optimizer_step`."""
        k = self.mini_batch_count(mine)
        if k == 1:
            stats = self.forward_backward(groups, mine, weights, scores, step)
            return stats, self.optimizer_step()
        self.sampling.check([r for g in groups for r in g])
        terms = self.batch_terms(groups)
        sums: dict[str, float] = collections.defaultdict(float)
        norms: list[float] = []
        for part in split_mini_batches(mine, k):
            for key, value in self._accumulate(groups, part, weights, scores, step, terms).items():
                sums[key] += value
            norms.append(self.optimizer_step(schedule=False))
        finite = [n for n in norms if math.isfinite(n)]
        if finite:
            self.scheduler.step()
        sums["loss"] /= k
        return self._batch_stats(groups, sums), sum(finite) / len(finite) if finite else math.nan

    def mini_batch_count(self, mine: list[Group]) -> int:
        """`batch.mini_batches`, capped by the fewest groups any rank holds (collective when above 1), so that
        every rank runs the same updates and each part holds at least one group on every rank."""
        k = self.config.batch.mini_batches
        if k == 1:
            return 1
        fewest = torch.tensor([len(mine)], device=self.info.device)
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
        count = max(1, min(k, int(fewest.item())))
        if count < k:
            log.warning(
                "%d mini-batches asked (batch.mini_batches) but a rank holds %d groups: %d updates",
                k,
                int(fewest.item()),
                count,
            )
        return count

    def _accumulate(
        self,
        groups: list[Group],
        mine: list[Group],
        weights: dict[str, float],
        scores: dict,
        step: int,
        terms: GroupTerms,
    ) -> dict[str, float]:
        """Forward and backward every micro-batch of `mine` (one mini-batch: its own L, D counted over its
        micro-batches on every rank); returns this rank's sums for `_batch_stats`."""
        micro = self.micro_batches(groups, mine, weights, terms)
        denominators = self.denominators(micro)
        sums: dict[str, float] = collections.defaultdict(float)
        sums["dropped_too_long"] = float(self.dropped_too_long)
        for mb, mb_denominators in zip(micro, denominators, strict=True):
            teacher = self._teacher_for(mb, scores)
            mb = mb.to(self.info.device)
            if self.has_teacher and not mb.filler:
                self._add_teacher_sums(sums, mb, teacher)
            if self.reference is not None:
                mb = self.reference.with_logprobs(mb)
            loss, stats = self.root(mb, teacher, step, mb_denominators)
            (loss * self.info.world_size).backward()  # FSDP averages over ranks; L is already the global mean
            sums["loss"] += stats.loss
            sums["tokens"] += stats.num_tokens
            for key in _MEAN_KEYS:
                value = getattr(stats, key)
                if not math.isnan(value):
                    sums[key] += value * stats.num_tokens
                    sums[f"{key}#n"] += stats.num_tokens
        return sums

    def _batch_stats(self, groups: list[Group], sums: dict[str, float]) -> dict[str, float]:
        """This rank's sums reduced over ranks into the step's statistics, plus the records' reward and tool
        statistics (the same on every rank: no reduction)."""
        keys = sorted(sums)
        reduced = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.info.device)
        dist.all_reduce(reduced)
        totals = dict(zip(keys, reduced.tolist(), strict=True))
        out = {k: totals.get(k, 0.0) for k in ("loss", "tokens", "dropped_too_long")}
        for key in _MEAN_KEYS + TEACHER_KEYS:
            if totals.get(f"{key}#n"):
                out[key] = totals[key] / totals[f"{key}#n"]
        if not self.has_teacher:
            for key in _TEACHER_STATS:
                out.pop(key, None)
        records, _ = without_too_long(groups, self.max_model_len)
        records = [r for g in records for r in g]
        out.update(reward_stats(records, self.config.loss.pass_threshold))
        out.update(tool_stats(records))
        return out

    @staticmethod
    def _add_teacher_sums(sums: dict[str, float], mb: MicroBatch, teacher: TeacherTensors) -> None:
        """The teacher-token diagnostics of a micro-batch's trained tokens, as sums and counts."""
        token_sums = teacher_token_sums(
            teacher.token_logprobs,
            mb.inputs.target_ids,
            mb.inputs.loss_weights > 0,
            teacher.topk_ids,
            teacher.topk_logprobs,
            teacher.tail_logprobs,
        )
        for key, value in token_sums.sums.items():
            sums[key] += value
            sums[f"{key}#n"] += token_sums.counts[key]

    def _teacher_for(self, mb: MicroBatch, scores: dict) -> TeacherTensors:
        if not mb.filler and all(r.rollout_id in scores for r in mb.records):
            teacher = teacher_scores_for(mb.records, scores, self.temperature)
        else:  # a zero-weight filler: placeholders, never weighted
            vocab = self.vocab_size if self.full_vocab else None
            teacher = placeholder_scores(len(mb.rows_N), self.top_k, self.temperature, vocab)
        return scores_to(teacher, self.info.device)

    def optimizer_step(self, schedule: bool = True) -> float:
        """Clip, then step unless the norm is not finite (and the LR schedule too, if `schedule`); returns the
        norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.root.parameters(), self.config.optim.max_grad_norm)
        full_tensor = getattr(norm, "full_tensor", None)  # a DTensor's norm under FSDP2
        norm = float(full_tensor() if full_tensor is not None else norm)
        if math.isfinite(norm):
            self.optimizer.step()
            if schedule:
                self.scheduler.step()
        else:
            log.warning("optimizer step skipped: gradient norm is %s", norm)
        self.optimizer.zero_grad(set_to_none=True)
        return norm
