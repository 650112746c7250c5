"""A packed micro-batch trains exactly as its sequences one at a time, on every attention path of the machine.

Float64 tiny models (Qwen2 with grouped-query attention, and Llama): the packed
row and the one-sequence rows compute the same per-token terms, summed in
other orders (other matmul shapes, attention per block vs per row). In float64
(unit roundoff u = 2^-53 ~ 1.1e-16) reordering a sum of n terms moves it by at
most ~n u sum|t| (Higham, Accuracy and Stability, sec. 4.2); with n < 200
token positions per gradient element that is < 1e-13 of the gradient's
scale, so rtol 1e-9 leaves four orders of margin and still catches a token
attending across sequences (an O(1) change of its hidden state) or a row
counted twice.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from protos.records import RolloutRecord
from student_trainer import attention
from student_trainer.batching import build_micro_batch, scores_to, teacher_scores_for
from student_trainer.loss.config import LossConfig
from student_trainer.loss.planning import Denominators, count_denominators, sequence_weights, step_denominators
from student_trainer.model import StudentLoss
from tests.fixtures.rollout import synthetic_top_k_scores

pytestmark = pytest.mark.timeout(180)

V, K = 96, 4
TOL = dict(rtol=1e-9, atol=1e-12)
PATHS = ["mask", "sdpa"] + (["flex"] if torch.cuda.is_available() else [])  # flex: CUDA only (tests/gpu)


@functools.cache
def tiny_student(arch: str, head_dim: int = 8) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=V,
        hidden_size=4 * head_dim,
        intermediate_size=8 * head_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    config = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64, attn_implementation=attention.register())
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10.0)  # sharper distributions than the default init
    return model


def rollouts(seed: int = 0) -> tuple[list[list[RolloutRecord]], dict]:
    rng = np.random.default_rng(seed)
    groups, scores = [], {}
    for g, sizes in enumerate([(5, 9, 3), (7, 4)]):
        group = []
        for s, n in enumerate(sizes):
            rid = f"g{g}s{s}"
            group.append(
                RolloutRecord(
                    rollout_id=rid,
                    prompt_id=f"p{g}",
                    group_id=f"p{g}",
                    group_size=len(sizes),
                    split="train",
                    prompt_ids=rng.integers(0, V, int(rng.integers(2, 6))).astype(np.int32),
                    response_ids=rng.integers(0, V, n).astype(np.int32),
                    response_mask=(rng.random(n) > 0.25).astype(np.uint8),
                    behaviour_logprobs=-rng.random(n).astype(np.float32) * 3,
                    reward=float(rng.integers(0, 2)),
                )
            )
            scores[rid] = synthetic_top_k_scores(rng, n, V, K, spread=4)
        groups.append(group)
    return groups, scores


def step_terms(groups, config: LossConfig) -> tuple[dict, dict | None]:
    """Sample weights and advantages over whole groups, as the trainer's step computes them."""
    records = [r for g in groups for r in g]
    index = {g: i for i, g in enumerate(dict.fromkeys(r.group_id for r in records))}
    weights, advantages = sequence_weights(
        torch.tensor([r.reward for r in records], dtype=torch.float64),
        torch.tensor([index[r.group_id] for r in records]),
        config,
    )
    ids = [r.rollout_id for r in records]
    return dict(zip(ids, weights.tolist(), strict=True)), None if advantages is None else dict(
        zip(ids, advantages.tolist(), strict=True)
    )


def run(model, micro_batches, scores, config: LossConfig, path: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the step made of `micro_batches` (D over all of them)."""
    model.zero_grad(set_to_none=True)
    root = StudentLoss(model, config, "sdpa" if path == "mask" else path)
    total = sum((count_denominators(mb.inputs, config) for mb in micro_batches), Denominators(0.0, 0.0))
    denominators = step_denominators(total, config)
    loss_sum = 0.0
    for mb in micro_batches:
        teacher = scores_to(teacher_scores_for(mb.records, scores), mb.input_ids_1T.device)
        loss, _ = root(mb, teacher, 0, denominators)
        loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "arch,normalization",
    [("qwen2", "token_mean"), ("qwen2", "sequence_mean"), ("qwen2", "sum"), ("llama", "token_mean")],
)
@pytest.mark.parametrize("path", PATHS)
def test_packed_micro_batch_equals_its_sequences_one_at_a_time(arch, normalization, path):
    model = tiny_student(arch)
    groups, scores = rollouts()
    config = LossConfig(
        divergence="fkl", normalization=normalization, rl_weight=0.5, reward_softmax={"enabled": True}, chunk_size=7
    )
    sample_weights, advantages = step_terms(groups, config)
    stale = {"g0s1": 0.25}
    kwargs = dict(sample_weights=sample_weights, advantages=advantages, block_mask=path == "mask")
    packed = build_micro_batch(groups, stale, **kwargs)
    assert (packed.attention_mask_11TT is not None) == (path == "mask")
    singles = [build_micro_batch([[r]], stale, **kwargs) for g in groups for r in g]

    loss_packed, grads_packed = run(model, [packed], scores, config, path)
    loss_single, grads_single = run(model, singles, scores, config, path)

    torch.testing.assert_close(loss_packed, loss_single, **TOL)
    assert grads_packed.keys() == grads_single.keys() and len(grads_packed) > 10
    for name, grad in grads_packed.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grad, grads_single[name], rtol=1e-9, atol=1e-12 * max(scale, 1.0), msg=name)


def test_packed_attention_differs_from_attending_across_sequences():
    """The check above can fail: a packed row without the per-sequence bounds (one causal sequence) differs."""
    model = tiny_student("qwen2")
    groups, scores = rollouts()
    config = LossConfig(divergence="fkl", chunk_size=7)
    packed = build_micro_batch(groups, {})
    loss_packed, _ = run(model, [packed], scores, config, "sdpa")
    leaky = build_micro_batch(groups, {})
    leaky.cu_tokens = (0, leaky.cu_tokens[-1])  # one sequence: later sequences see earlier ones
    loss_leaky, _ = run(model, [leaky], scores, config, "sdpa")
    assert abs(loss_leaky - loss_packed) > 1e-6


def test_flex_attention_is_refused_off_cuda_with_the_fix():
    with pytest.raises(ValueError, match="batch.attention=flex needs CUDA"):
        attention.resolve_method("flex", torch.device("cpu"))
    assert attention.resolve_method("auto", torch.device("cpu")) == "sdpa"
