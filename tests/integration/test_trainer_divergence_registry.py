"""Adding a divergence is one function and one registry row: a toy divergence trains a step of the real trainer step
(`StepRunner` on the FSDP-wrapped tiny model, one gloo rank on 127.0.0.1) and matches a float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from protos.records import RolloutRecord
from student_trainer.config import TrainerConfig
from student_trainer.loss.registry import BUCKETS, DIVERGENCES, Divergence, DivergenceArgs
from student_trainer.model import StudentLoss, init_distributed, load_student, shard_student
from student_trainer.optim import build_optimizer
from student_trainer.step import StepRunner

pytestmark = pytest.mark.timeout(180)

K, FLOOR = 4, -100.0


def squared_error(s_hat: Tensor, p_hat: Tensor, t: Tensor, args: DivergenceArgs) -> tuple[Tensor, Tensor]:
    """The toy divergence: 1/2 sum_b (p_b - q_b)^2 over the buckets; d/ds_b = (p_b - q_b) p_b (dp/ds = p)."""
    q = t.to(s_hat.dtype).clamp(min=args.floor).exp()
    diff = p_hat - q
    return 0.5 * diff.square().sum(-1), diff * p_hat


@pytest.fixture
def toy_divergence(monkeypatch):
    calls = []

    def counted(*args):
        calls.append(1)
        return squared_error(*args)

    monkeypatch.setitem(DIVERGENCES, "toy_squared_error", Divergence(counted, BUCKETS))  # the one registry row
    return calls


def synthetic_batch(vocab: int, seed: int = 7) -> tuple[list[list[RolloutRecord]], dict]:
    """Three groups of two rollouts with masked tool tokens, and teacher top-k (distinct ids) + tail scores."""
    rng = np.random.default_rng(seed)
    groups, scores = [], {}
    for g in range(3):
        group = []
        for s in range(2):
            p, n = int(rng.integers(3, 7)), int(rng.integers(4, 9))
            rid = f"g{g}s{s}"
            mask = (rng.random(n) > 0.25).astype(np.uint8)
            mask[0] = 1
            group.append(
                RolloutRecord(
                    rollout_id=rid,
                    prompt_id=f"p{g}",
                    group_id=f"p{g}",
                    group_size=2,
                    split="train",
                    prompt_ids=rng.integers(0, vocab, p).astype(np.int32),
                    response_ids=rng.integers(0, vocab, n).astype(np.int32),
                    response_mask=mask,
                    behaviour_logprobs=-rng.random(n).astype(np.float32),
                    reward=1.0,
                )
            )
            logits = rng.normal(size=(n, vocab)) * 3
            full = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            ids = np.argsort(-full, axis=1)[:, :K]
            topk = np.take_along_axis(full, ids, 1)
            tail = np.log(-np.expm1(np.logaddexp.reduce(topk, axis=1)))
            scores[rid] = _Scores(
                full[np.arange(n), group[-1].response_ids].astype(np.float32),
                ids.astype(np.int32),
                topk.astype(np.float32),
                tail.astype(np.float32),
            )
        groups.append(group)
    return groups, scores


class _Scores:
    """The numpy reply the score source hands the step (teacher_server.client.TeacherScores' arrays)."""

    def __init__(self, token_logprobs, topk_ids, topk_logprobs, tail_logprobs) -> None:
        self.token_logprobs, self.topk_ids, self.topk_logprobs, self.tail_logprobs = (
            token_logprobs,
            topk_ids,
            topk_logprobs,
            tail_logprobs,
        )


def reference_loss(model: torch.nn.Module, groups, scores) -> Tensor:
    """Token-mean toy loss over every response token with mask 1, from each sequence's own float64 forward."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for r in (r for g in groups for r in g):
        ids = torch.from_numpy(np.concatenate([r.prompt_ids, r.response_ids]).astype(np.int64))[None]
        p = len(r.prompt_ids)
        s = torch.log_softmax(model(ids).logits[0, p - 1 : -1].double(), -1)  # [n, V]
        sc = scores[r.rollout_id]
        top = torch.from_numpy(sc.topk_ids).long()
        in_top = torch.zeros_like(s, dtype=torch.bool).scatter(1, top, True)
        s_tail = s.masked_fill(in_top, -math.inf).logsumexp(-1)
        s_b = torch.cat([s.gather(1, top), s_tail[:, None]], 1).clamp(min=FLOOR)
        t_b = torch.cat([torch.from_numpy(sc.topk_logprobs), torch.from_numpy(sc.tail_logprobs)[:, None]], 1)
        rows, _ = squared_error(s_b, s_b.exp(), t_b.double(), DivergenceArgs(FLOOR))
        mask = torch.from_numpy(r.response_mask).bool()
        total = total + rows[mask].sum()
        count += int(mask.sum())
    return total / count


def test_a_registered_toy_divergence_trains_a_step(tiny_model_dir, toy_divergence):
    config = TrainerConfig(
        model=str(tiny_model_dir),
        loss={"divergence": "toy_squared_error"},
        batch={"max_tokens_per_micro_batch": 40},
        optim={"lr": 1e-6},
        dist={"backend": "gloo"},
    )
    assert config.teacher_top_k() == 20  # the row says top-k + tail or full: the trainer asks for a top-k
    info = init_distributed(config.dist)
    torch.manual_seed(0)
    root = shard_student(
        StudentLoss(load_student(str(tiny_model_dir), info.device), config.loss), config.dist, info.device
    )
    optimizer, scheduler = build_optimizer(root, config.optim, 10)
    runner = StepRunner(root, optimizer, scheduler, config, info, top_k=K, teacher_temperature=1.0)
    groups, scores = synthetic_batch(vocab=root.lm.get_output_embeddings().weight.shape[0])

    stats = runner.forward_backward(groups, groups, {}, scores, step=0)

    assert toy_divergence, "the registered function was never called"
    reference = load_student(str(tiny_model_dir), torch.device("cpu"), dtype=torch.float64)
    want = reference_loss(reference, groups, scores)
    want.backward()
    # float32 chunked forward/backward of a 2-layer model vs float64: errors of a few float32 ulps per op,
    # summed over O(100) terms; TOL32 of the loss specification (tests/unit/test_losses.py)
    assert stats["loss"] == pytest.approx(want.item(), rel=2e-4, abs=2e-6)
    assert stats["tokens"] == sum(int(r.response_mask.sum()) for g in groups for r in g)
    # gradients: the same float32-vs-float64 error, relative to each tensor's largest entry (measured <= 1.5e-5)
    grads = {name.removeprefix("lm."): p.grad for name, p in root.named_parameters()}
    for name, param in reference.named_parameters():
        got = grads[name].full_tensor() if hasattr(grads[name], "full_tensor") else grads[name]
        scale = param.grad.abs().max().item()
        torch.testing.assert_close(got.double(), param.grad, rtol=0, atol=2e-4 * scale + 1e-12, msg=name)

    runner.optimizer_step()
    after = runner.forward_backward(groups, groups, {}, scores, step=1)
    # AdamW's first step moves each weight by ~lr sign(g): first-order change -lr sum|g| (here ~3e-4 at lr 1e-6),
    # curvature ~lr^2, float32 noise ~1e-7: the toy loss falls
    assert after["loss"] < stats["loss"]
