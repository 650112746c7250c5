"""The demo's before/after evaluation on held-out prompts: task score, agreement with the teacher, diversity, samples.

For each model (the teacher as the ceiling, the student before training, the
student after) on the held-out prompts (`opd_apps/demo/data/demo_heldout.jsonl`,
never trained on):

- **task score**: greedy answers checked by the task's reward
  (`opd_apps.demo.task.is_correct`), with a 95% Wilson interval;
- **top-1 agreement under teacher forcing**: on the teacher's own greedy
  answers (prompt + answer, its end-of-turn token included), the share of
  answer positions where the student's most likely next token is the
  teacher's; 95% interval by a bootstrap over prompts (positions of one answer
  are not independent, so a Wilson interval over positions would be too
  narrow);
- **diversity across prompts**: the share of distinct answers (first lines,
  case and spacing normalised) and distinct-1/2 over the answers' words, so a
  model that answers every prompt alike shows it;
- **samples**: greedy and sampled (fixed temperature and seeds) answers to a
  few prompts.

Every model answers in this process through the rollout workers' engine
(`rollout_workers.engine_hf.HFBackend` around the loaded model, the code the
`hf` rollout backend runs): greedy as top-k 1, samples at a fixed temperature
and seed, each answer ending at the model's end-of-turn token. The teacher
loads from the same directory the teacher service serves; its top-1
for the agreement comes from the running teacher service's `Score` RPC, asked
once for all answers. The statistics are the evaluation core's
(`student_trainer.evaluation`, as in `opd eval`). Does not train,
and does not compute the divergence (the trainer's eval rounds do).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd_apps.demo.task import is_correct
from opd_apps.eval.student import teacher_forced_agreement
from student_trainer.evaluation import bootstrap_ratio_interval, diversity, wilson_interval

SAMPLE_TEMPERATURE = 0.7
SAMPLE_SEEDS = (0, 1)  # sampled answers shown per prompt and model
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 2000, 0


@dataclass(frozen=True)
class Item:
    """One held-out prompt, rendered with the chat template."""

    prompt_id: str
    prompt: str
    answer: str
    prompt_ids: list[int]


@dataclass
class ModelResult:
    """One model's greedy answers on the items, and what they score."""

    label: str
    texts: list[str]
    correct: list[bool]
    agreement: list[tuple[int, int]] | None = None  # per item: (positions agreeing, positions), students only
    samples: dict[str, dict[str, str]] = field(default_factory=dict)  # prompt_id -> {"greedy"|"seed N": text}

    def score(self) -> dict[str, float]:
        k, n = sum(self.correct), len(self.correct)
        low, high = wilson_interval(k, n)
        return {"correct": k, "items": n, "score": k / n, "low": low, "high": high}

    def top1_agreement(self) -> dict[str, float] | None:
        if not self.agreement:
            return None
        agree, total = (sum(col) for col in zip(*self.agreement, strict=True))
        low, high = bootstrap_ratio_interval(self.agreement, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
        return {"value": agree / total if total else float("nan"), "positions": total, "low": low, "high": high}

    def diversity(self) -> dict[str, Any]:
        d = diversity(self.texts, [answer_key(t) for t in self.texts])
        return {"distinct_answers": d.distinct_answers_share, "distinct_1": d.distinct_1, "distinct_2": d.distinct_2}


def answer_key(text: str) -> str | None:
    """The answer's first non-empty line, lower-cased with spacing normalised (None for an empty answer)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return re.sub(r"\s+", " ", lines[0].strip().lower()) if lines else None


def load_items(path: Path, tokenizer: Any, limit: int | None = None) -> list[Item]:
    """The held-out prompt file (id, prompt, answer) rendered with the tokenizer's chat template."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    items = []
    for row in rows[:limit]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        items.append(Item(row["id"], row["prompt"], row["answer"], ids))
    return items


def load_model(model_dir: Path, base_dir: Path | None = None):
    """A model directory, or a LoRA student's published adapter directory (peft's `adapter_config.json`) merged into
    `base_dir`, the base it was trained on."""
    import torch
    from transformers import AutoModelForCausalLM

    if not (model_dir / "adapter_config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    from peft import PeftModel

    if base_dir is None:
        raise ValueError(f"{model_dir} is a LoRA adapter: name the base model it applies to")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload().eval()


def answer_engine(model: Any, tokenizer: Any) -> Any:
    """The rollout workers' transformers engine around a loaded model (its context length as max_model_len)."""
    from rollout_workers.engine_hf import HFBackend

    return HFBackend(model, tokenizer, int(model.config.max_position_embeddings))


def stop_ids(model: Any) -> tuple[int, ...]:
    """The model's end-of-sequence ids (its generation config's; an answer ends with one of them)."""
    eos = model.generation_config.eos_token_id
    return tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else ()


async def answers(
    engine: Any, items: Sequence[Item], max_tokens: int, stops: tuple[int, ...], shown: int
) -> tuple[list[list[int]], dict[str, dict[int, list[int]]]]:
    """(greedy answers of every item, {prompt_id: {seed: sampled answer}} for the first `shown` items), as token
    ids up to and including the stop token. Greedy is top-k 1; samples are at SAMPLE_TEMPERATURE, top-k and
    top-p off, with each seed of SAMPLE_SEEDS."""
    from rollout_workers.engine import SampleParams

    greedy_params = SampleParams(max_tokens, temperature=1.0, top_k=1, stop_token_ids=stops)
    greedy = [
        list((await engine.generate(it.prompt_ids, greedy_params, f"demo-{it.prompt_id}")).token_ids) for it in items
    ]
    sampled: dict[str, dict[int, list[int]]] = {}
    for it in items[:shown]:
        for seed in SAMPLE_SEEDS:
            params = SampleParams(max_tokens, temperature=SAMPLE_TEMPERATURE, seed=seed, stop_token_ids=stops)
            out = await engine.generate(it.prompt_ids, params, f"demo-{it.prompt_id}-{seed}")
            sampled.setdefault(it.prompt_id, {})[seed] = list(out.token_ids)
    return greedy, sampled


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def evaluate_model(
    label: str,
    model_dir: Path,
    tokenizer: Any,
    items: Sequence[Item],
    max_tokens: int,
    shown: int,
    base_dir: Path | None = None,
) -> tuple[ModelResult, list[list[int]], Any]:
    """(a model's ModelResult, its greedy answers' token ids, the loaded model): greedy answers on every item,
    their task score, and greedy + seeded samples on the first `shown` items. `base_dir`: the base of a LoRA
    adapter directory (`load_model`)."""
    model = load_model(model_dir, base_dir)
    greedy, sampled = asyncio.run(answers(answer_engine(model, tokenizer), items, max_tokens, stop_ids(model), shown))
    texts = [_decode(tokenizer, ids) for ids in greedy]
    result = ModelResult(label, texts, [is_correct(t, it.answer) for t, it in zip(texts, items, strict=True)])
    for it, text in zip(items[:shown], texts, strict=False):
        result.samples[it.prompt_id] = {"greedy": text}
        for seed, ids in sampled[it.prompt_id].items():
            result.samples[it.prompt_id][f"seed {seed}"] = _decode(tokenizer, ids)
    return result, greedy, model


def forced_sequences(items: Sequence[Item], teacher_answers: Sequence[Sequence[int]]) -> list[tuple[list[int], int]]:
    """(prompt + the teacher's greedy answer, where the answer starts) per item; items without an answer are left
    out."""
    return [
        (it.prompt_ids + list(ans), len(it.prompt_ids)) for it, ans in zip(items, teacher_answers, strict=True) if ans
    ]


def fetch_teacher_scores(teacher_address: str, sequences: Sequence[tuple[list[int], int]]) -> TeacherReplies:
    """The teacher's top-1 on every sequence through its `Score` RPC, asked once (the server batches them)."""
    from teacher_server.client import TeacherClientSync

    with TeacherClientSync(teacher_address, client_name="demo-report") as client:
        return TeacherReplies(sequences, client.score_many(list(sequences), top_k=1))


def agreement_per_item(
    model: Any, teacher: TeacherReplies, sequences: Sequence[tuple[list[int], int]]
) -> list[tuple[int, int]]:
    """(positions where the student's top-1 is the teacher's, positions) per sequence, under teacher forcing
    (`opd_apps.eval.teacher_forced_agreement`, one call per sequence: the bootstrap needs per-prompt counts)."""
    from opd_apps.eval.student import StudentScorer

    async def per_item() -> list[tuple[int, int]]:
        scorer, out = StudentScorer(model), []
        for seq in sequences:
            share, positions = await teacher_forced_agreement(scorer, teacher, [seq])
            out.append((round((share or 0.0) * positions), positions))
        return out

    return asyncio.run(per_item())


class TeacherReplies:
    """The teacher's `Score` replies, fetched once, answered per sequence (the `score_many` of a teacher client)."""

    def __init__(self, sequences: Sequence[tuple[list[int], int]], replies: Sequence[Any]) -> None:
        self._by_key = {(tuple(ids), start): r for (ids, start), r in zip(sequences, replies, strict=True)}

    async def score_many(self, sequences: Sequence[tuple[list[int], int]], top_k: int = 1) -> list[Any]:
        return [self._by_key[(tuple(ids), start)] for ids, start in sequences]
