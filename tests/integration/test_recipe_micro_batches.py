"""The trainer's step under the recipe's micro-batching and reduction, through `StepRunner`.

With `batch.micro_batch_sequences = k` and `loss.reduction = micro_batch_mean`, one step's gradient is the mean
over the rank's micro-batches (k sequences each, in order) of each micro-batch's own token-mean gradient, which
is what a one-micro-batch step on that micro-batch's sequences alone computes. Float64 student: the two sides
add the same terms in other orders (< 500 per gradient element, error ~1e-14 of the scale), so rtol 1e-9 of
each tensor's largest entry has orders of margin; the step-wide token mean differs by > 1e-3 of it here.
"""

from __future__ import annotations

import pytest
import torch

from student_trainer.config import TrainerConfig
from student_trainer.model import StudentLoss, init_distributed, load_student, shard_student
from student_trainer.optim import build_optimizer
from student_trainer.step import StepRunner
from tests.fixtures.split_step import TOP_K, full_gradients, synthetic_groups

pytestmark = pytest.mark.timeout(300)

K = 4


def _runner(model_dir: str, reduction: str, sequences: int) -> StepRunner:
    config = TrainerConfig(
        model=model_dir,
        loss={"divergence": "fkl", "reduction": reduction},
        batch={"micro_batch_sequences": sequences},
        dist={"backend": "gloo", "mixed_precision": "none"},
    )
    info = init_distributed(config.dist)
    root = StudentLoss(load_student(model_dir, info.device, dtype=torch.float64), config.loss)
    root = shard_student(root, config.dist, info.device)
    optimizer, scheduler = build_optimizer(root, config.optim, 10)
    return StepRunner(root, optimizer, scheduler, config, info, top_k=TOP_K, teacher_temperature=1.0)


def _step(model_dir: str, reduction: str, sequences: int, groups, scores) -> tuple[dict, dict]:
    runner = _runner(model_dir, reduction, sequences)
    stats = runner.forward_backward(groups, groups, {}, scores, step=0)
    return stats, full_gradients(runner.root)


def test_micro_batch_mean_is_the_mean_of_each_micro_batchs_own_step(tiny_model_dir):
    groups, scores = synthetic_groups(_runner(str(tiny_model_dir), "step", 0).vocab_size)
    records = [r for g in groups for r in g]  # 13 sequences: micro-batches of 4, 4, 4, 1
    parts = [records[i : i + K] for i in range(0, len(records), K)]
    stats, grads = _step(str(tiny_model_dir), "micro_batch_mean", K, groups, scores)
    alone = [_step(str(tiny_model_dir), "step", 0, [part], scores) for part in parts]
    assert stats["loss"] == pytest.approx(sum(s["loss"] for s, _ in alone) / len(parts), rel=1e-9)
    for name, grad in grads.items():
        want = sum(g[name] for _, g in alone) / len(parts)
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-9 * want.abs().max().item() + 1e-15, msg=name)
    _, step_wide = _step(str(tiny_model_dir), "step", K, groups, scores)
    name = max(grads, key=lambda n: grads[n].abs().max().item())
    assert (step_wide[name] - grads[name]).abs().max() > 1e-3 * grads[name].abs().max()
