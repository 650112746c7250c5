"""The `hf` backend: a transformers causal LM scored in batches under `torch.no_grad`.

Per batch: one padded forward of the decoder to final hidden states, then, per
sequence, the lm-head in chunks of `hf_chunk_rows` positions: log-sum-exp,
actual-token log-prob, top-k and the exact tail mass (log-sum-exp of the
logits outside the top-k) are computed on the device chunk by chunk, so no
`[tokens, vocab]` float32 tensor for the whole batch ever exists. Teacher
temperature is exact here (logits / T before the softmax).

The scheduler's express lane (`score_batch_express`) runs on a thread of its
own beside the bulk batches, with cooperative preemption (`preemption.py`):
every module of the decoder and the lm-head has a forward pre-hook at which a
bulk thread parks while an express batch runs, so a light request's small
batch has the cores to itself after at most one module of the bulk batch
instead of waiting for the bulk batch to end, and the bulk batch then goes on
where it stopped. On a CPU a bulk batch's linear layers run in pieces of
`hf_preempt_rows` positions with a preemption point between them, so that
"one module" is at most one such piece. All threads run at the normal OS priority. On CUDA the
express kernels also go to a high-priority stream, which the GPU schedules
ahead of the bulk stream's pending work.

Limit: the lm-head is applied as `get_output_embeddings()` to the decoder's
final hidden states; models that post-process logits (e.g. Gemma-2's logit
soft-capping) are not reproduced exactly.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from opd.model_source import resolve_model_dir, tokenizer_facts
from teacher_server.config import TeacherConfig
from teacher_server.engine import GenerateResult, GenerateWork, ScoreResult, ScoreWork, TeacherEngine
from teacher_server.info import TeacherInfo
from teacher_server.preemption import ExpressGate, YieldStats

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class HFEngine(TeacherEngine):
    def __init__(self, config: TeacherConfig) -> None:
        from transformers import AutoModelForCausalLM

        path = resolve_model_dir(config.model)
        self._device = _pick_device(config.engine.device)
        dtype = _pick_dtype(config.engine.dtype, self._device)
        # transformers types the loaded model as a protocol that its own .to() and .generate() cannot bind to
        self._model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self._device).eval()  # pyright: ignore[reportArgumentType]
        self._decoder = self._model.get_decoder()
        lm_head = self._model.get_output_embeddings()
        if lm_head is None:
            raise ValueError(f"{path}: the model has no output embeddings (lm head); the hf backend scores with it")
        self._lm_head = lm_head
        self._chunk_rows = config.engine.hf_chunk_rows
        # Off the event loop. On CUDA two batches may be in flight, so one batch's host-side work (padding,
        # copies, splitting) overlaps the next one's GPU compute; on CPU they would only fight for cores.
        self.preferred_inflight_batches = 2 if self._device.type == "cuda" else 1
        self._gate = ExpressGate()
        self._executor = ThreadPoolExecutor(
            max_workers=self.preferred_inflight_batches,
            thread_name_prefix="hf-engine",
            initializer=self._gate.mark_bulk_thread,
        )
        # Preemption points: before every module of the decoder (layers, and their attention and MLP parts) and
        # before every lm-head chunk. A hook costs a few microseconds when no express batch runs (2% of a
        # one-request forward of the tiny test model, nothing measurable from 8 requests on). Without the
        # express lane there is no express batch to give way to: no hooks, as before the lane existed.
        if config.scheduler.express_lane:
            for module in [*self._decoder.modules(), self._lm_head]:
                module.register_forward_pre_hook(self._preemption_point)
            if self._device.type == "cpu" and config.engine.hf_preempt_rows:
                self._split_linears(config.engine.hf_preempt_rows)
        self._express = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-express")
        # Hand the GIL over within 0.5 ms rather than 5: the express thread should not wait out a bulk thread's
        # Python stretch between its own (GIL-free) torch kernels. Kept with the lane off too: a forward beside a
        # busy Python thread (the event loop's part) ran 1.4-1.6x faster at 0.5 ms than at 5 ms (tiny model, one
        # core, batches of 8 and 64), so the short interval does not cost the bulk work.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._express_stream = torch.cuda.Stream(priority=-1) if self._device.type == "cuda" else None
        fingerprint, eos = tokenizer_facts(config.tokenizer, path)
        model_max = int(getattr(self._model.config, "max_position_embeddings", 0) or 1 << 20)
        max_len = min(config.engine.max_model_len or model_max, model_max)
        self.eos_token_ids = eos
        self.info = TeacherInfo(
            model_name=config.served_name or str(config.model),
            backend="hf",
            vocab_size=int(self._lm_head.weight.shape[0]),
            tokenizer_fingerprint=fingerprint,
            max_model_len=max_len,
            max_top_k=config.engine.max_top_k,
            supports_full_vocab=config.engine.allow_full_vocab,
            supports_temperature=True,
            dtype=str(dtype).removeprefix("torch."),
        )
        log.info("hf engine ready: %s on %s (%s), vocab %d", path, self._device, dtype, self.info.vocab_size)

    async def score_batch(self, works: list[ScoreWork]) -> list[ScoreResult | Exception]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._score_sync, works)

    async def score_batch_express(self, works: list[ScoreWork]) -> list[ScoreResult | Exception]:
        loop = asyncio.get_running_loop()
        with self._gate.express():  # from hand-over on: a bulk batch parks at its next preemption point
            return await loop.run_in_executor(self._express, self._score_express_sync, works)

    def yield_stats(self) -> YieldStats:
        return self._gate.snapshot()

    def _preemption_point(self, _module: torch.nn.Module, _args: tuple) -> None:
        self._gate.checkpoint()

    def _split_linears(self, piece_rows: int) -> None:
        """On a CPU a bulk batch's linear layer is one long kernel (8,192 positions through a 128 x 256 layer of
        the tiny test model: ~7 ms of a core), during which an express batch that just arrived shares the core
        with it: its forward took about twice its solo time. On bulk threads, a linear layer on more than
        `piece_rows` positions runs in pieces of that many rows with a preemption point between them (same
        arithmetic per row; express threads and small inputs take the plain path)."""
        for module in [*self._decoder.modules(), self._lm_head]:
            if type(module) is torch.nn.Linear:
                pieced = functools.partial(self._linear_in_pieces, module, piece_rows)
                module.forward = pieced  # pyright: ignore[reportAttributeAccessIssue]  # names its input x_NI

    def _linear_in_pieces(self, module: torch.nn.Linear, piece_rows: int, x_NI: torch.Tensor) -> torch.Tensor:
        rows = x_NI.numel() // x_NI.shape[-1]
        if rows <= piece_rows or not self._gate.on_bulk_thread():
            return torch.nn.functional.linear(x_NI, module.weight, module.bias)
        flat_RI = x_NI.reshape(rows, x_NI.shape[-1])
        out_RO = flat_RI.new_empty((rows, module.out_features))
        weight_IO = module.weight.t()
        for start in range(0, rows, piece_rows):
            if start:
                self._gate.checkpoint()
            piece = slice(start, start + piece_rows)
            if module.bias is None:
                torch.mm(flat_RI[piece], weight_IO, out=out_RO[piece])
            else:
                torch.addmm(module.bias, flat_RI[piece], weight_IO, out=out_RO[piece])
        return out_RO.reshape(*x_NI.shape[:-1], module.out_features)

    async def generate(self, work: GenerateWork) -> GenerateResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._generate_sync, work)

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._express.shutdown(wait=True)

    def _score_express_sync(self, works: list[ScoreWork]) -> list[ScoreResult | Exception]:
        if self._express_stream is None:
            return self._score_sync(works)
        with torch.cuda.stream(self._express_stream):
            results = self._score_sync(works)  # its host copies synchronise with this stream
        return results

    # -- scoring ---------------------------------------------------------------------------

    @torch.no_grad()
    def _score_sync(self, works: list[ScoreWork]) -> list[ScoreResult | Exception]:
        lengths = [w.num_tokens for w in works]
        ids_BL = torch.zeros((len(works), max(lengths)), dtype=torch.long)
        mask_BL = torch.zeros_like(ids_BL)
        for i, w in enumerate(works):  # right padding: positions of real tokens are unchanged
            ids_BL[i, : lengths[i]] = torch.from_numpy(w.token_ids.astype(np.int64))
            mask_BL[i, : lengths[i]] = 1
        ids_BL, mask_BL = ids_BL.to(self._device), mask_BL.to(self._device)
        hidden_BLH = self._decoder(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
        # Group the batch by request options; each group's rows go through the lm-head together and
        # come back to the host in one copy per array (no per-sequence device syncs).
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(works):
            groups.setdefault((w.top_k, w.full_vocab, w.temperature, w.token_ranks), []).append(i)
        results: list[ScoreResult | Exception] = [None] * len(works)  # type: ignore[list-item]
        for indices in groups.values():
            # Logits at position p-1 give the distribution of token p.
            hidden_NH = torch.cat([hidden_BLH[i, works[i].score_from - 1 : lengths[i] - 1] for i in indices])
            targets_N = torch.cat([ids_BL[i, works[i].score_from : lengths[i]] for i in indices])
            token_lp, topk_ids, topk_lp, tail_lp, full_lp, ranks = self._score_rows(
                hidden_NH, targets_N, works[indices[0]]
            )
            splits = np.cumsum([works[i].num_positions for i in indices])[:-1]
            token_lps, topk_idss, topk_lps, tail_lps = (
                np.split(a, splits) for a in (token_lp, topk_ids, topk_lp, tail_lp)
            )
            full_lps = np.split(full_lp, splits) if full_lp is not None else [None] * len(indices)
            rankss = np.split(ranks, splits) if ranks is not None else [None] * len(indices)
            for j, i in enumerate(indices):
                results[i] = ScoreResult(
                    token_logprobs=token_lps[j],
                    topk_ids=topk_idss[j],
                    topk_logprobs=topk_lps[j],
                    tail_logprobs=tail_lps[j],
                    full_logprobs=full_lps[j],
                    token_ranks=rankss[j],
                )
        return results

    def _score_rows(
        self, hidden_NH: torch.Tensor, targets_N: torch.Tensor, w: ScoreWork
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(token_lp N, topk_ids N x k, topk_lp N x k, tail N, full N x V | None, ranks N | None) as host arrays."""
        parts = [
            self._score_chunk(hidden_NH[s : s + self._chunk_rows], targets_N[s : s + self._chunk_rows], w)
            for s in range(0, hidden_NH.shape[0], self._chunk_rows)
        ]
        cols = [torch.cat(col) if col[0] is not None else None for col in zip(*parts, strict=True)]
        token_lp, topk_ids, topk_lp, tail, full, ranks = (c.cpu().numpy() if c is not None else None for c in cols)
        # the first four are computed for every request (k may be 0); full and ranks only when asked
        assert token_lp is not None and topk_ids is not None and topk_lp is not None and tail is not None
        return (
            token_lp,
            topk_ids.astype(np.int32),
            topk_lp,
            tail,
            full,
            None if ranks is None else ranks.astype(np.int32),
        )

    def _score_chunk(self, hidden_CH: torch.Tensor, targets_C: torch.Tensor, w: ScoreWork) -> tuple:
        logits_CV = self._lm_head(hidden_CH).float()
        if w.temperature != 1.0:
            logits_CV = logits_CV / w.temperature
        lse_C = torch.logsumexp(logits_CV, dim=-1)
        token_logit_C1 = logits_CV.gather(1, targets_C[:, None])
        token_lp_C = token_logit_C1[:, 0] - lse_C
        # vLLM's rank: tokens at least as likely as the actual one (before the top-k scatter below)
        ranks_C = (logits_CV >= token_logit_C1).sum(dim=-1) if w.token_ranks else None
        # Full log-probs leave the device chunk by chunk: only requests that asked for them pay [N, V] on the host.
        full_CV = (logits_CV - lse_C[:, None]).cpu() if w.full_vocab else None
        if w.top_k > 0:
            top_vals_CK, top_ids_CK = torch.topk(logits_CV, w.top_k, dim=-1)
            topk_lp_CK = top_vals_CK - lse_C[:, None]
            rest_CV = logits_CV.scatter_(1, top_ids_CK, float("-inf"))  # in place: the chunk's logits are done
            tail_C = torch.logsumexp(rest_CV, dim=-1) - lse_C
        else:
            top_ids_CK = torch.zeros((logits_CV.shape[0], 0), dtype=torch.long, device=logits_CV.device)
            topk_lp_CK = torch.zeros((logits_CV.shape[0], 0), device=logits_CV.device)
            tail_C = torch.zeros_like(lse_C)
        return (token_lp_C, top_ids_CK, topk_lp_CK, tail_C, full_CV, ranks_C)

    # -- sampling --------------------------------------------------------------------------

    @torch.no_grad()
    def _generate_sync(self, work: GenerateWork) -> GenerateResult:
        if work.seed is not None:
            torch.manual_seed(work.seed)
        greedy = work.temperature == 0.0
        input_ids = torch.from_numpy(work.prompt_ids.astype(np.int64))[None].to(self._device)
        stop = list(work.stop_token_ids) or list(self.eos_token_ids)
        out = self._model.generate(  # pyright: ignore[reportAttributeAccessIssue]  # see __init__
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=work.max_tokens,
            do_sample=not greedy,
            temperature=None if greedy else work.temperature,
            top_p=None if greedy else work.top_p,
            top_k=None,
            eos_token_id=stop or None,
            pad_token_id=stop[0] if stop else 0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        new_ids_T = out.sequences[0, input_ids.shape[1] :]
        # Raw logits: the teacher's temperature-1 log-prob of each sample, as the vllm backend reports it.
        logprobs = [torch.log_softmax(s[0].float(), -1)[t] for s, t in zip(out.logits, new_ids_T, strict=False)]
        ids = new_ids_T.cpu().numpy().astype(np.int32)
        finished = len(ids) > 0 and int(ids[-1]) in stop
        return GenerateResult(
            token_ids=ids,
            logprobs=torch.stack(logprobs).cpu().numpy().astype(np.float32) if logprobs else np.zeros(0, np.float32),
            finish_reason="stop" if finished else "length",
        )
