"""The engine interface every backend implements, and the work/result types that cross it.

A backend turns `ScoreWork` (validated token ids + what to return) into a
`ScoreResult` of numpy arrays, many at a time, samples for `Generate`, and
describes itself in a `TeacherInfo` (`info.py`).
It does not validate, queue, authenticate or encode: the scheduler and
servicer own that. Backends live in `engine_hf.py` and `engine_vllm.py` and
are imported lazily so the client never pulls torch or vllm.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from teacher_server.info import TeacherInfo
from teacher_server.preemption import YieldStats

if TYPE_CHECKING:
    from teacher_server.config import TeacherConfig


@dataclass(frozen=True)
class ScoreWork:
    """One validated scoring request: positions [score_from, len(token_ids)) are scored."""

    token_ids: np.ndarray  # int32 [L]
    score_from: int
    top_k: int
    full_vocab: bool = False
    temperature: float = 1.0
    token_ranks: bool = False  # also return each actual token's rank (the OpenAI-compatible port asks)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_positions(self) -> int:
        return self.num_tokens - self.score_from


@dataclass
class ScoreResult:
    """Teacher log-probs for P = len - score_from positions (float32 numpy arrays)."""

    token_logprobs: np.ndarray  # [P]
    topk_ids: np.ndarray  # int32 [P, k]
    topk_logprobs: np.ndarray  # [P, k]
    tail_logprobs: np.ndarray  # [P]
    full_logprobs: np.ndarray | None = None  # [P, V]
    token_ranks: np.ndarray | None = None  # int32 [P], when asked: tokens at least as likely as the actual (1 = top)


@dataclass(frozen=True)
class GenerateWork:
    prompt_ids: np.ndarray  # int32 [L]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class GenerateResult:
    token_ids: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float32 [T], under the distribution sampled from
    finish_reason: str  # "stop" | "length"


class TeacherEngine(abc.ABC):
    """A loaded teacher model. All methods run on the server's event loop."""

    info: TeacherInfo  # what the Info RPC answers; a backend fills it when its model is loaded
    eos_token_ids: tuple[int, ...] = ()  # where Generate stops when the request names no stop tokens
    preferred_inflight_batches: int = 1  # batches worth running at once (scheduler.max_inflight_batches = 0)
    # Tokens the engine schedules per step when it batches concurrent requests itself (vllm: its scheduler's
    # max_num_batched_tokens); None when a batch runs as one unit (hf). With a value, the scheduler hands bulk
    # work over request by request and keeps at most `scheduler.bulk_engine_steps` steps of it in the engine.
    step_tokens: int | None = None
    # Whether express batches may run beside each other (vllm: they are only requests with priority); hf runs
    # them on one thread, so there the next one waits for the previous one anyway.
    concurrent_express: bool = False

    @abc.abstractmethod
    async def score_batch(self, works: list[ScoreWork]) -> list[ScoreResult | Exception]:
        """Score every work item; a per-item failure is returned in its slot, not raised."""

    async def score_batch_express(self, works: list[ScoreWork]) -> list[ScoreResult | Exception]:
        """`score_batch` for the scheduler's express lane: a small batch that should not wait for the bulk
        batches already running. Backends give it priority where they can; the default runs it as any batch."""
        return await self.score_batch(works)

    def yield_stats(self) -> YieldStats:
        """How often, and for how long in all, bulk batches gave way to express batches (totals since start).
        Zero for backends whose express priority is not cooperative preemption (vllm: request priority)."""
        return YieldStats()

    @abc.abstractmethod
    async def generate(self, work: GenerateWork) -> GenerateResult:
        """Sample up to `max_tokens` tokens after the prompt."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources."""


def tail_from_topk(topk_logprobs_PK: np.ndarray) -> np.ndarray:
    """log(1 - sum_k exp(topk)) per row, in float64, -inf when the top-k holds all the mass.

    For backends that only see the top-k; the hf backend computes the tail
    exactly from the logits outside the top-k instead.
    """
    if topk_logprobs_PK.shape[-1] == 0:
        return np.zeros(topk_logprobs_PK.shape[:-1], dtype=np.float32)
    x = topk_logprobs_PK.astype(np.float64)
    top_mass_log = np.logaddexp.reduce(x, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(top_mass_log < 0, np.log(-np.expm1(np.minimum(top_mass_log, 0.0))), -np.inf)
    return tail.astype(np.float32)


def create_engine(config: TeacherConfig) -> TeacherEngine:
    """Build the configured backend (blocking: loads weights). vLLM needs a running event loop."""
    if config.backend == "hf":
        from teacher_server.engine_hf import HFEngine

        return HFEngine(config)
    from teacher_server.engine_vllm import VLLMEngine

    return VLLMEngine(config)
