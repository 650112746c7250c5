# pyright: reportMissingImports=false
"""The TRL side of `opd bench trl`: TRL's own on-policy distillation of the demo's job, in TRL's venv.

Run by `opd bench trl` as `TRL_VENV/bin/python trl_job.py JOB.json` (never imported by opd: it imports only
TRL, transformers, datasets and torch, which opd does not depend on). JOB.json holds the teacher and student
directories, the prompts in training order and the recipe (`opd_apps.bench.trl_compare.Recipe`).

`trl.DistillationTrainer` (TRL 1.16: fully on-policy, the student samples every batch; `beta=0` selects the
forward KL of the teacher over the student, over the full vocabulary, token-mean) with the recipe: the prompts
in the given order (each repeated `samples` times, the dataset not reshuffled, `prompts_per_step x samples`
sequences per optimizer step), AdamW at `lr` after `warmup_steps` linear warm-up then constant, gradient norm
clipped at 1, float32 on the CPU, sampling at `temperature` with top-k and top-p off, up to `max_tokens` new
tokens. Writes OUT/steps.jsonl (per step: end time, sequences, completion tokens, loss, seconds generating) and
the trained student to OUT/final.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DistillationConfig, DistillationTrainer


class TimedTrainer(DistillationTrainer):
    """Counts the completion tokens and the seconds of each generation batch."""

    gen_s: float = 0.0
    tokens: int = 0

    def _generate_and_score_completions(self, inputs):
        started = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        self.gen_s += time.perf_counter() - started
        self.tokens += int(out["completion_mask"].sum().item())
        return out


class StepLog(TrainerCallback):
    """One line per optimizer step in steps.jsonl, written when the step's loss is logged."""

    def __init__(self, path: Path, batch: int) -> None:
        self.path, self.batch = path, batch
        self.trainer: TimedTrainer | None = None
        self.step_start = self.step_end = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_end = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or self.trainer is None:
            return
        line = {
            "step": state.global_step,
            "time": self.step_end,
            "samples": self.batch,
            "tokens": self.trainer.tokens,
            "loss": float(logs["loss"]),
            "gen_s": self.trainer.gen_s,
            "step_s": self.step_end - self.step_start,
        }
        self.trainer.tokens, self.trainer.gen_s = 0, 0.0
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    torch.manual_seed(job["seed"])
    tokenizer = AutoTokenizer.from_pretrained(job["student"])
    student = AutoModelForCausalLM.from_pretrained(job["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(job["teacher"], dtype=torch.float32)
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in job["prompts"] for _ in range(job["samples"])]
    batch = job["prompts_per_step"] * job["samples"]
    config = DistillationConfig(
        output_dir=str(out / "trainer"),
        max_steps=job["steps"],
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        learning_rate=job["lr"],
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=job["warmup_steps"],
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=0.0,
        temperature=job["temperature"],
        top_k=0,
        top_p=1.0,
        max_completion_length=job["max_tokens"],
        shuffle_dataset=False,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=job["seed"],
        dataloader_num_workers=0,
    )
    log = StepLog(out / "steps.jsonl", batch)
    trainer = TimedTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[log],
    )
    log.trainer = trainer
    trainer.train()
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
