"""Full-vocabulary distillation end to end: the trainer's score source asks a real hf teacher (gRPC on
127.0.0.1) for full log-probs, the trainer's step trains on them, and loss and gradients match a float64
reference written from the formulas; TIP with `jsd_support: full` trains; a teacher that does not allow full
replies is refused at start-up with the flag to change.

The student is float64 and the teacher's float32 replies are taken as given on both sides, so the step and
the reference differ only by summation order: in float64 (u ~ 1.1e-16), over < 100 token positions, that is
< 1e-12 of each gradient's scale; rtol 1e-9 keeps three orders of margin.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opd.loop_thread import LoopThread
from protos.records import RolloutRecord
from protos.tokenizer_fingerprint import tokenizer_fingerprint
from student_trainer.config import TrainerConfig
from student_trainer.loss import weighting as wt
from student_trainer.model import StudentLoss, init_distributed, load_student, shard_student
from student_trainer.optim import build_optimizer
from student_trainer.score_sources.base import TeacherMismatch
from student_trainer.score_sources.grpc_teacher import TeacherServiceSource
from student_trainer.step import StepRunner
from tests.fixtures.teacher import start_teacher

pytestmark = pytest.mark.timeout(240)
FLOOR = -100.0


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A student other than the teacher (same tokenizer), so the divergence and its gradient are far from 0."""
    from tests.fixtures.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("student"), seed=3)


def config_for(student_dir, address: str, **loss) -> TrainerConfig:
    return TrainerConfig(
        model=str(student_dir),
        teacher={"addresses": [address], "timeout_s": 60},
        loss=loss,
        batch={"max_tokens_per_micro_batch": 40},
        dist={"backend": "gloo", "mixed_precision": "none"},
    )


def rollouts(vocab: int) -> list[list[RolloutRecord]]:
    rng = np.random.default_rng(11)
    groups = []
    for g in range(2):
        group = []
        for s in range(2):
            n = int(rng.integers(5, 10))
            mask = (rng.random(n) > 0.2).astype(np.uint8)
            mask[0] = 1
            group.append(
                RolloutRecord(
                    rollout_id=f"g{g}s{s}",
                    prompt_id=f"p{g}",
                    group_id=f"p{g}",
                    group_size=2,
                    split="train",
                    prompt_ids=rng.integers(0, vocab, int(rng.integers(3, 6))).astype(np.int32),
                    response_ids=rng.integers(0, vocab, n).astype(np.int32),
                    response_mask=mask,
                    behaviour_logprobs=np.zeros(n, np.float32),
                    reward=1.0,
                )
            )
        groups.append(group)
    return groups


def fetch_full_scores(config: TrainerConfig, student_dir, groups) -> dict:
    from transformers import AutoTokenizer

    io = LoopThread("test-full-vocab")
    source = TeacherServiceSource(config, io)
    try:
        k = config.teacher_top_k()  # 0, or 20 when TIP runs
        assert source.full_vocab and source.top_k == k
        tokenizer = AutoTokenizer.from_pretrained(student_dir)
        source.check(tokenizer_fingerprint(tokenizer), len(tokenizer), "student")
        assert source.bytes_per_token() == 4 * (2 + 2 * k) + 4 * len(tokenizer)  # float32 arrays + int32 ids
        return source.fetch([r for g in groups for r in g]).result(timeout=60)
    finally:
        source.close()
        io.stop()


def reference(student_dir, groups, scores, divergence: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean reverse KL or JSD(1/2) over the full vocabulary, float64, autograd."""
    model = load_student(str(student_dir), torch.device("cpu"), dtype=torch.float64)
    total, count = 0.0, 0
    for r in [r for g in groups for r in g]:
        ids = torch.from_numpy(np.concatenate([r.prompt_ids, r.response_ids]).astype(np.int64))[None]
        p = len(r.prompt_ids)
        s = torch.log_softmax(model(ids).logits[0, p - 1 : -1], -1).clamp(min=FLOOR)
        t = torch.tensor(scores[r.rollout_id].full_logprobs, dtype=torch.float64).clamp(min=FLOOR)
        if divergence == "rkl":
            rows = (s.exp() * (s - t)).sum(-1)
        else:
            log_m = torch.logaddexp(s, t) - np.log(2.0)
            rows = 0.5 * (t.exp() * (t - log_m)).sum(-1) + 0.5 * (s.exp() * (s - log_m)).sum(-1)
        mask = torch.from_numpy(r.response_mask).bool()
        total = total + rows[mask].sum()
        count += int(mask.sum())
    loss = total / count
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def runner_for(config: TrainerConfig, student_dir) -> StepRunner:
    info = init_distributed(config.dist)
    root = StudentLoss(load_student(str(student_dir), info.device, dtype=torch.float64), config.loss)
    root = shard_student(root, config.dist, info.device)
    optimizer, scheduler = build_optimizer(root, config.optim, 10)
    return StepRunner(root, optimizer, scheduler, config, info, config.teacher_top_k(), teacher_temperature=1.0)


@pytest.mark.parametrize("divergence", ["rkl", "jsd"])
def test_full_vocabulary_step_matches_a_float64_reference(hf_teacher, student_dir, divergence):
    config = config_for(student_dir, hf_teacher.address, divergence=divergence, support="full")
    runner = runner_for(config, student_dir)
    groups = rollouts(runner.vocab_size)
    scores = fetch_full_scores(config, student_dir, groups)
    assert all(
        scores[r.rollout_id].full_logprobs.shape == (len(r.response_ids), runner.vocab_size) for g in groups for r in g
    )

    stats = runner.forward_backward(groups, groups, {}, scores, step=0)

    want_loss, want_grads = reference(student_dir, groups, scores, divergence)
    assert stats["loss"] == pytest.approx(want_loss.item(), rel=1e-9)
    for name, param in runner.root.named_parameters():
        got = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        want = want_grads[name.removeprefix("lm.")]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * want.abs().max().item() + 1e-15, msg=name)


def test_tip_with_full_vocabulary_jsd_trains_a_step(hf_teacher, student_dir):
    config = config_for(
        student_dir,
        hf_teacher.address,
        divergence="jsd",
        support="full",
        token_selection={"enabled": True, "keep_fraction": 0.5, "divergence_exponent": 1.0, "jsd_support": "full"},
    )
    runner = runner_for(config, student_dir)
    groups = rollouts(runner.vocab_size)
    scores = fetch_full_scores(config, student_dir, groups)
    micro = runner.micro_batches(groups, groups, {})
    kept = sum(wt.num_kept(mb.num_valid_tokens, 0.5) for mb in micro)

    stats = runner.forward_backward(groups, groups, {}, scores, step=0)

    assert np.isfinite(stats["loss"]) and stats["loss"] > 0
    assert stats["fraction_kept"] == pytest.approx(kept / stats["tokens"], abs=0.1)
    assert np.isfinite(runner.optimizer_step())


def test_a_teacher_without_full_vocabulary_is_refused_with_the_flag_to_set(tiny_model_dir, student_dir):
    from transformers import AutoTokenizer

    server = start_teacher(tiny_model_dir, "hf", engine={"allow_full_vocab": False})
    io = LoopThread("test-full-vocab-refused")
    source = TeacherServiceSource(config_for(student_dir, server.address, divergence="rkl", support="full"), io)
    try:
        tokenizer = AutoTokenizer.from_pretrained(student_dir)
        with pytest.raises(TeacherMismatch, match="--engine-allow-full-vocab"):
            source.check(tokenizer_fingerprint(tokenizer), len(tokenizer), "student")
    finally:
        source.close()
        io.stop()
        server.stop()
