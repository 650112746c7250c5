"""`opd export` turns a trainer checkpoint into a Hugging Face model that transformers loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SAVE = textwrap.dedent("""
    import sys, torch
    from student_trainer.checkpoint import save_checkpoint
    from student_trainer.config import TrainerConfig
    from student_trainer.model import StudentLoss, init_distributed, load_student, shard_student
    from student_trainer.optim import build_optimizer
    cfg = TrainerConfig(model=sys.argv[1])
    info = init_distributed(cfg.dist)
    root = shard_student(StudentLoss(load_student(cfg.model, info.device), cfg.loss), cfg.dist, info.device)
    opt, _ = build_optimizer(root, cfg.optim, 10)
    with torch.no_grad():
        for p in root.parameters():
            p.add_(0.25)
    save_checkpoint(sys.argv[2], 7, root, opt, {"step": 7}, 2)
""")


def test_export_writes_the_checkpoint_weights_as_an_hf_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    subprocess.run([sys.executable, "-c", SAVE, str(tiny_model_dir), str(tmp_path / "ck")], check=True, timeout=120)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "opd",
            "export",
            "--checkpoint",
            str(tmp_path / "ck"),
            "--model",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "final"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for (name, a), b in zip(base.named_parameters(), final.parameters(), strict=True):
        torch.testing.assert_close(b, a + 0.25, msg=name)
    assert (tmp_path / "final" / "tokenizer.json").is_file()


def test_export_without_a_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "opd",
            "export",
            "--checkpoint",
            str(tmp_path),
            "--model",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "no committed checkpoint" in out.stderr
