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


def _export(tiny_model_dir, checkpoint, out, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opd", "export", "--checkpoint", str(checkpoint), "--model", str(tiny_model_dir)]
        + ["--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.timeout(900)  # the session's LoRA run (`lora_run`) may be trained first
def test_export_of_a_lora_run_writes_the_adapter_and_with_merge_a_plain_model_of_equal_logits(
    tiny_model_dir, lora_run, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = lora_run
    adapter = _export(tiny_model_dir, out / "ck", tmp_path / "adapter")
    assert adapter.returncode == 0, adapter.stderr[-2000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    merged = _export(tiny_model_dir, out / "ck", tmp_path / "merged", "--merge")
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert not any("lora" in k for k in AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict())
    # Both forwards in float64, so what differs is the export alone: the merged weights W + s B A stored in float32
    # (half an ulp each, ~6e-8 relative), which moves logits of magnitude < 20 by far less than 1e-5.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").double()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64)
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = peft_model.eval()(ids).logits, plain.eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (
        want - AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)(ids).logits
    ).abs().max() > 1e-3


def test_export_merge_of_a_full_weight_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path):
    subprocess.run([sys.executable, "-c", SAVE, str(tiny_model_dir), str(tmp_path / "ck")], check=True, timeout=120)
    out = _export(tiny_model_dir, tmp_path / "ck", tmp_path / "x", "--merge")
    assert out.returncode == 2 and "--merge is for LoRA runs" in out.stderr
