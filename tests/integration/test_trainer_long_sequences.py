"""One trainer step at the GPU preset's shapes on CPU: a group of 8 x 12,288 response tokens with 16,384-token
micro-batches (deploy/presets/train-gpu.yaml), on a tiny model. Once, the group was one ~98k-token
micro-batch carrying a ~10 GB `[T, T]` mask; now each sequence is its own micro-batch and attends per
sequence, so no tensor of the step is anywhere near T x T."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from protos.records import RolloutRecord
from student_trainer.batching import split_across_ranks
from student_trainer.config import TrainerConfig
from student_trainer.model import StudentLoss, init_distributed, load_student, shard_student
from student_trainer.optim import build_optimizer
from student_trainer.step import StepRunner
from tests.fixtures.largest_tensor import LargestTensor

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

V, K, PROMPT, RESPONSE, SAMPLES, BUDGET = 384, 4, 16, 12_288, 8, 16_384


@pytest.fixture
def one_thread():
    """One intra-op thread, so that the denormal flush `init_distributed` sets on this thread covers every
    kernel (torch's worker threads keep their own flags; with them the attention backward is ~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory) -> str:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=PROMPT + RESPONSE,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("long-context")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return str(path)


def preset_group() -> tuple[list[list[RolloutRecord]], dict]:
    rng = np.random.default_rng(0)
    group, scores = [], {}
    for s in range(SAMPLES):
        rid = f"s{s}"
        group.append(
            RolloutRecord(
                rollout_id=rid,
                prompt_id="p",
                group_id="p",
                group_size=SAMPLES,
                split="train",
                prompt_ids=rng.integers(0, V, PROMPT).astype(np.int32),
                response_ids=rng.integers(0, V, RESPONSE).astype(np.int32),
                response_mask=np.ones(RESPONSE, np.uint8),
                behaviour_logprobs=np.full(RESPONSE, -3.0, np.float32),
                reward=float(s % 2),
            )
        )
        scores[rid] = SimpleNamespace(
            token_logprobs=np.full(RESPONSE, -3.0, np.float32),
            topk_ids=np.tile(np.arange(K, dtype=np.int32), (RESPONSE, 1)),
            topk_logprobs=np.full((RESPONSE, K), -2.0, np.float32),
            tail_logprobs=np.full(RESPONSE, np.log1p(-K * np.exp(-2.0)), np.float32),
        )
    return [group], scores


def test_one_step_at_the_gpu_presets_shapes_completes_without_a_quadratic_tensor(long_context_model, one_thread):
    config = TrainerConfig(
        model=long_context_model,
        loss={"divergence": "fkl", "rl_weight": 0.1},
        batch={"max_tokens_per_micro_batch": BUDGET},
        dist={"backend": "gloo"},
    )
    info = init_distributed(config.dist)
    root = shard_student(
        StudentLoss(load_student(long_context_model, info.device), config.loss), config.dist, info.device
    )
    optimizer, scheduler = build_optimizer(root, config.optim, 10)
    runner = StepRunner(root, optimizer, scheduler, config, info, top_k=K, teacher_temperature=1.0)
    groups, scores = preset_group()
    mine = split_across_ranks(groups, info.world_size)[info.rank]
    micro = runner.micro_batches(groups, mine, {})
    assert len(micro) == SAMPLES and all(mb.attention_mask_11TT is None for mb in micro)

    with LargestTensor() as probe:
        stats = runner.forward_backward(groups, mine, {}, scores, step=0)
    grad_norm = runner.optimizer_step()

    assert stats["tokens"] == SAMPLES * RESPONSE
    assert np.isfinite(stats["loss"]) and np.isfinite(grad_norm) and grad_norm > 0
    t = PROMPT + RESPONSE  # the largest tensor is one sequence's logits chunk [rows, V]: 1/32 of T^2
    assert probe.largest <= t * V < t * t // 16, f"a tensor of {probe.largest} elements (T^2 = {t * t})"
