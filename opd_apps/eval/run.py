"""The work of `opd eval`: sample n responses per prompt, reward them, score them against the teacher.

1. `sample_all`: every (prompt, sample i) runs through the rollout workers'
   engine (`rollout_workers.engine` backends, single-turn `run_episode`) with
   a per-sample seed derived from the base seed, the prompt id and i
   (`sample_seed`, as the workers derive theirs), so a rerun draws the same
   samples; then the reward function runs in a thread with a time limit. A
   reward that raises or times out is recorded as failed (reward None), never
   as 0.
2. `TeacherScoring`: checks the teacher's `Info` before any sampling (same
   tokenizer fingerprint as the student, the top-k it allows), then asks it
   for every response's scores (`TeacherClient.score`, several in flight)
   while the student's teacher-forced forward (`opd_apps.eval.student.StudentScorer`)
   runs, and reduces the per-token divergences and diagnostics
   (`student_trainer.evaluation`) to token means.

Does not build the report (`opd_apps.eval.report`) or parse flags (`opd_apps.eval.config`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from opd_apps.eval.config import EvalCommandConfig
from opd_apps.eval.model import EvalError
from opd_apps.progress import Progress
from protos.records import PromptRecord
from rollout_workers.engine import GenerationBackend, SampleParams, sample_seed
from rollout_workers.episode import EpisodeLimits, run_episode
from rollout_workers.rewards import RewardFn, extract_final_answer, normalize_answer
from student_trainer.evaluation import TokenSums, divergences, reply_diagnostics
from student_trainer.score_sources.base import TeacherMismatch, check_teacher

DEFAULT_TEACHER_TOP_K = 20
PREFLIGHT_TIMEOUT_S = 30.0


@dataclass
class EvalSample:
    """One sampled response with its reward and, when a teacher is given, its own token means."""

    prompt_id: str
    index: int
    seed: int | None
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finish_reason: str
    reward: float | None = None
    reward_error: str | None = None  # why the reward failed (exception or time limit)
    answer: str | None = None  # the extracted final answer, normalised
    teacher: dict[str, float | None] | None = None


def sample_params(config: EvalCommandConfig) -> SampleParams:
    s = config.sampling
    return SampleParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)


async def run_reward(
    fn: RewardFn | None, text: str, record: PromptRecord, timeout_s: float
) -> tuple[float | None, str | None]:
    """(reward, error): the function's value (None when it returns None), or (None, why) when it fails."""
    if fn is None:
        return None, None
    try:
        value = await asyncio.wait_for(asyncio.to_thread(fn, text, record), timeout_s)
    except TimeoutError:
        return None, f"timed out after {timeout_s} s"
    except Exception as exc:  # noqa: BLE001 - a failed reward is recorded on the sample, not fatal
        return None, f"{type(exc).__name__}: {exc}"
    return (None if value is None else float(value)), None


async def sample_all(
    backend: GenerationBackend,
    records: list[PromptRecord],
    prompt_ids: dict[str, list[int]],
    reward_fn: RewardFn | None,
    config: EvalCommandConfig,
) -> list[EvalSample]:
    """n samples per prompt, rewarded; in (prompt, index) order."""
    s, params = config.sampling, sample_params(config)
    limits = EpisodeLimits(max_turns=1, max_response_tokens=s.max_tokens)
    gate = asyncio.Semaphore(config.concurrency)
    bar = Progress(len(records) * s.n, "sampling", enabled=config.progress)

    async def one(record: PromptRecord, index: int) -> EvalSample:
        seed = sample_seed(s.seed, record.prompt_id, index)
        ids = prompt_ids[record.prompt_id]
        async with gate:
            episode = await run_episode(
                backend, ids, replace(params, seed=seed), request_id=f"eval-{record.prompt_id}-{index}", limits=limits
            )
        text = backend.tokenizer.decode(episode.response_ids, skip_special_tokens=True)
        reward, error = await run_reward(reward_fn, text, record, config.reward.timeout_s)
        answer = extract_final_answer(text)
        bar.update()
        return EvalSample(
            record.prompt_id,
            index,
            seed,
            ids,
            list(episode.response_ids),
            text,
            episode.finish_reason,
            reward,
            error,
            None if answer is None else normalize_answer(answer),
        )

    try:
        return list(await asyncio.gather(*(one(r, i) for r in records for i in range(s.n))))
    finally:
        bar.close()


class TeacherScoring:
    """The teacher side of an evaluation: a checked connection, then per-response scores and token means."""

    def __init__(self, config: EvalCommandConfig) -> None:
        from teacher_server.client import TeacherClient

        t = config.teacher
        self.config = config
        self.client = TeacherClient(
            t.addresses, token=t.token, client_name=t.client_name, timeout_s=t.timeout_s,
            logprob_dtype=t.logprob_dtype, tls=t.tls, tls_ca_file=t.tls_ca_file, tls_cert_file=t.tls_cert_file,
            tls_key_file=t.tls_key_file, tls_server_name=t.tls_server_name,
        )  # fmt: skip
        self.info: Any = None
        self.top_k = 0

    async def check(self, student_fingerprint: str, vocab_size: int, longest_sequence: int) -> None:
        """Info, tokenizer, length and top-k checks (`longest_sequence`: longest prompt + max tokens); EvalError
        naming the fix."""
        from teacher_server.client import TeacherClientError

        where = ", ".join(self.config.teacher.addresses)
        try:
            self.info = await self.client.info(timeout_s=min(PREFLIGHT_TIMEOUT_S, self.config.teacher.timeout_s))
        except TeacherClientError as exc:
            raise EvalError(f"teacher at {where} did not answer Info ({exc}); check --teacher HOST:PORT") from None
        try:  # the one teacher-compatibility check the trainer uses (the tokenizer is what a divergence needs)
            check_teacher(self.info, student_fingerprint, None, "the student", top_k=0, temperature=1.0, where=where)
        except TeacherMismatch as exc:
            raise EvalError(
                f"the teacher at {where} uses another tokenizer than the student ({exc}); evaluate against a "
                f"teacher of the student's family, or without --teacher"
            ) from None
        if vocab_size > self.info.vocab_size:
            raise EvalError(
                f"the student's tokenizer has {vocab_size} tokens, the teacher's vocabulary "
                f"{self.info.vocab_size}; they must agree"
            )
        if longest_sequence > self.info.max_model_len:
            raise EvalError(
                f"the longest prompt plus --sampling-max-tokens is {longest_sequence} tokens, more than the "
                f"teacher's max_model_len {self.info.max_model_len}; lower --sampling-max-tokens"
            )
        wanted = self.config.teacher.top_k
        if wanted is not None and wanted > self.info.max_top_k:
            raise EvalError(f"--teacher-top-k {wanted} exceeds the teacher's max_top_k {self.info.max_top_k}; lower it")
        self.top_k = min(DEFAULT_TEACHER_TOP_K, self.info.max_top_k) if wanted is None else wanted

    async def score(self, samples: list[EvalSample], scorer: Any) -> TokenSums:
        """Score every non-empty response; sets `sample.teacher` (its own means) and returns the token means."""
        from teacher_server.client import TeacherClientError

        gate = asyncio.Semaphore(self.config.teacher.concurrency)

        async def teacher_of(sample: EvalSample):
            async with gate:
                return await self.client.score(
                    sample.prompt_ids + sample.response_ids, len(sample.prompt_ids), top_k=self.top_k
                )

        todo = [s for s in samples if s.response_ids]
        tasks = [asyncio.create_task(teacher_of(s)) for s in todo]
        totals = TokenSums()
        bar = Progress(len(todo), "teacher scoring", enabled=self.config.progress)
        try:
            for sample, task in zip(todo, tasks, strict=True):
                teacher = await task
                student = await asyncio.to_thread(
                    scorer.score, sample.prompt_ids + sample.response_ids, len(sample.prompt_ids), teacher.topk_ids
                )
                per_token = {
                    **divergences(student, teacher),
                    **reply_diagnostics(np.asarray(sample.response_ids), teacher),
                }
                sample.teacher = totals.add_all(per_token)
                bar.update()
        except TeacherClientError as exc:
            raise EvalError(f"teacher scoring failed ({type(exc).__name__}: {exc})") from None
        finally:
            bar.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return totals

    async def close(self) -> None:
        await self.client.close()
