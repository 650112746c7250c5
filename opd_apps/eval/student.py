"""The student's teacher-forced log-probs for evaluation, and top-1 agreement with the teacher.

`StudentScorer` runs a transformers forward of the student over a given
sequence and returns, for the positions from `score_from` on, what the
divergences of `student_trainer.evaluation` need at temperature 1: the log-prob
of the token actually there, the log-probs at the teacher's top-k ids, the
log-mass outside them (summed directly, no 1 - sum cancellation) and the
argmax. As the trainer does, it runs the decoder to final hidden states and
applies the lm-head in chunks of positions, so no [tokens, vocab] logits
tensor exists for a long response. `teacher_forced_agreement` asks the teacher
and the student about the same sequences and returns the top-1 agreement.

Does not sample (the rollout engine does) and does not reduce over responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from student_trainer.evaluation import StudentTokenStats, top1_agreement

CHUNK_POSITIONS = 256


class StudentScorer:
    """A student model (transformers, eval mode) that scores given token sequences."""

    def __init__(self, model: Any) -> None:
        config = model.config
        for attribute in ("final_logit_softcapping", "logit_scale"):
            if getattr(config, attribute, None) not in (None, 1.0):
                raise ValueError(
                    f"the student's config sets {attribute}: its logits are transformed after the lm-head, "
                    f"which the chunked scorer does not apply; evaluate without --teacher"
                )
        self.model = model
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto", dtype: str = "auto") -> StudentScorer:
        import torch
        from transformers import AutoModelForCausalLM

        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
        torch_dtype = (
            (torch.bfloat16 if dev.type == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
        # transformers declares `to` with functools.wraps(nn.Module.to), which pyright reads as unbound
        model = model.to(dev).eval()  # pyright: ignore[reportArgumentType]
        return cls(model)

    def score(
        self, token_ids: Sequence[int] | np.ndarray, score_from: int, topk_ids: np.ndarray | None = None
    ) -> StudentTokenStats:
        """Stats for positions [score_from, len(token_ids)); `topk_ids` [P, k] are the ids to read (k may be 0)."""
        import torch

        length = len(token_ids)
        if not 1 <= score_from <= length:
            raise ValueError(f"score_from must lie in [1, {length}] (got {score_from})")
        positions = length - score_from
        ids_PK = np.zeros((positions, 0), np.int64) if topk_ids is None else np.asarray(topk_ids, np.int64)
        if ids_PK.shape[0] != positions:
            raise ValueError(f"topk_ids has {ids_PK.shape[0]} rows for {positions} positions")
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if ids_PK.size and int(ids_PK.max()) >= vocab:
            raise ValueError(
                f"the teacher's top-k holds token id {int(ids_PK.max())}, outside the student's vocabulary of "
                f"{vocab}; teacher and student must share one vocabulary"
            )
        ids_1L = torch.as_tensor(np.asarray(token_ids, np.int64), device=self.device)[None]
        with torch.inference_mode():
            hidden_PH = self.model.get_decoder()(input_ids=ids_1L).last_hidden_state[0, score_from - 1 : length - 1]
            parts = [
                self._chunk(
                    hidden_PH[i : i + CHUNK_POSITIONS],
                    ids_1L[0, score_from + i : score_from + i + CHUNK_POSITIONS],
                    torch.as_tensor(ids_PK[i : i + CHUNK_POSITIONS], device=self.device),
                )
                for i in range(0, positions, CHUNK_POSITIONS)
            ]
        if not parts:
            k = ids_PK.shape[1]
            return StudentTokenStats(np.zeros(0), np.zeros((0, k)), np.zeros(0), np.zeros(0, np.int64))
        return StudentTokenStats(*(np.concatenate([p[i] for p in parts]) for i in range(4)))

    def _chunk(self, hidden_CH: Any, next_C: Any, ids_CK: Any) -> tuple[np.ndarray, ...]:
        import torch

        logprobs_CV = torch.log_softmax(self.model.get_output_embeddings()(hidden_CH).float(), dim=-1)
        tail_CV = logprobs_CV.exp().scatter(1, ids_CK, 0.0)
        return (
            logprobs_CV.gather(1, next_C[:, None])[:, 0].double().cpu().numpy(),
            logprobs_CV.gather(1, ids_CK).double().cpu().numpy(),
            tail_CV.sum(-1).double().log().cpu().numpy(),
            logprobs_CV.argmax(-1).cpu().numpy(),
        )


async def teacher_forced_agreement(
    scorer: StudentScorer, client: Any, sequences: Sequence[tuple[Sequence[int], int]], *, top_k: int = 1
) -> tuple[float | None, int]:
    """(share of positions where the student's argmax is the teacher's top-1, positions compared).

    `client` is a `teacher_server.client.TeacherClient`; each sequence is (token ids, score_from), e.g. a
    prompt and a reference answer with score_from = len(prompt). None when there are no positions.
    """
    import asyncio

    agree = total = 0
    replies = await client.score_many(sequences, top_k=max(1, top_k))
    for (ids, start), teacher in zip(sequences, replies, strict=True):
        student = await asyncio.to_thread(scorer.score, ids, start)
        hits = top1_agreement(student.argmax_ids, teacher.topk_ids, teacher.topk_logprobs)
        agree, total = agree + int(hits.sum()), total + hits.size
    return (agree / total if total else None), total
