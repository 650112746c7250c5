"""The report of `opd eval`: one JSON document, a Markdown rendering of it, and every sample as JSONL.

`build_report` reduces the samples: per prompt the scored samples n (reward
not None), the correct ones c (reward > pass_threshold) and pass@k; overall
the mean pass@k over prompts with n >= k, the sample accuracy with its Wilson
95 % interval (samples treated as independent trials, which samples of one
prompt are not: read it as a rough band), the mean reward, reward failures,
diversity and response lengths, and the teacher's token means when a teacher
was given. `write_report` writes `eval.json`, `eval.md` and `samples.jsonl`.
Does not sample or score.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opd import __version__
from opd_apps.eval.config import EvalCommandConfig
from opd_apps.eval.run import EvalSample
from protos.records import PromptRecord
from student_trainer.evaluation import METRICS, diversity, mean_pass_at_k, pass_at_k, wilson_interval

SCHEMA = 1
MAX_PROMPT_ROWS = 50


def is_correct(sample: EvalSample, threshold: float) -> bool:
    return sample.reward is not None and sample.reward > threshold


def _per_prompt(
    records: Sequence[PromptRecord], samples: Sequence[EvalSample], config: EvalCommandConfig
) -> list[dict]:
    by_prompt: dict[str, list[EvalSample]] = {r.prompt_id: [] for r in records}
    for sample in samples:
        by_prompt[sample.prompt_id].append(sample)
    rows = []
    for record in records:
        group = by_prompt[record.prompt_id]
        scored = [s for s in group if s.reward is not None]
        correct = sum(is_correct(s, config.reward.pass_threshold) for s in scored)
        answers = [s.answer for s in group if s.answer is not None]
        rows.append(
            {
                "prompt_id": record.prompt_id,
                "reference": record.answer,
                "samples": len(group),
                "scored": len(scored),
                "correct": correct,
                "pass_at_k": {str(k): pass_at_k(len(scored), correct, k) for k in config.pass_ks() if len(scored) >= k},
                "distinct_answers": len(set(answers)),
                "answers": answers[:8],
            }
        )
    return rows


def _teacher_section(teacher: dict[str, Any] | None) -> dict[str, Any] | None:
    if teacher is None:
        return None
    means = teacher.pop("means")
    return {
        **teacher,
        "metrics": {name: {"value": means.get(name), "description": text} for name, text in METRICS.items()},
    }


def build_report(
    config: EvalCommandConfig,
    model: dict[str, Any],
    records: Sequence[PromptRecord],
    samples: Sequence[EvalSample],
    *,
    teacher: dict[str, Any] | None = None,
    wall_s: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The JSON report; `teacher` carries the endpoint facts and `means` (token means by metric)."""
    threshold = config.reward.pass_threshold
    per_prompt = _per_prompt(records, samples, config)
    counts = [(row["scored"], row["correct"]) for row in per_prompt]
    scored = [s for s in samples if s.reward is not None]
    rewards = [s.reward for s in samples if s.reward is not None]
    correct = sum(is_correct(s, threshold) for s in scored)
    lengths = [len(s.response_ids) for s in samples]
    within = [row["distinct_answers"] / row["samples"] for row in per_prompt if row["samples"]]
    div = diversity([s.text for s in samples], [s.answer for s in samples])
    return {
        "schema": SCHEMA,
        "opd_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {**model, "backend": config.backend, "tokenizer": config.tokenizer},
        "prompts": {"file": config.prompts, "count": len(records), "instruction": config.dataset.instruction},
        "sampling": config.sampling.model_dump(),
        "reward": {
            "function": config.reward.function,
            "pass_threshold": threshold,
            "samples": len(samples),
            "scored": len(scored),
            "failed": sum(s.reward_error is not None for s in samples),
            "none": sum(s.reward is None and s.reward_error is None for s in samples),
            "mean": sum(rewards) / len(rewards) if rewards else None,
        },
        "pass_at_k": {
            str(k): {"value": r.value, "prompts": r.prompts}
            for k, r in ((k, mean_pass_at_k(counts, k)) for k in config.pass_ks())
        },
        "sample_accuracy": {
            "value": correct / len(scored) if scored else None,
            "correct": correct,
            "scored": len(scored),
            "wilson95": list(wilson_interval(correct, len(scored))) if scored else None,
        },
        "diversity": {
            "distinct_answers_share": div.distinct_answers_share,
            "answers": div.answers,
            "distinct_1": div.distinct_1,
            "distinct_2": div.distinct_2,
            "within_prompt_distinct_answers": sum(within) / len(within) if within else None,
        },
        "responses": {
            "tokens_mean": sum(lengths) / len(lengths) if lengths else None,
            "truncated_share": sum(s.finish_reason == "length" for s in samples) / len(samples) if samples else None,
        },
        "teacher": _teacher_section(teacher),
        "per_prompt": per_prompt,
        "wall_s": wall_s or {},
    }


def _finite(value: Any) -> Any:
    """NaN / inf -> None, recursively, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _fmt(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_markdown(report: dict[str, Any]) -> str:
    s, r, acc = report["sampling"], report["reward"], report["sample_accuracy"]
    lines = [
        "# opd eval",
        "",
        f"- model: `{report['model']['path']}` ({report['model']['source']}"
        + (f", checkpoint `{report['model']['checkpoint']}`" if report["model"].get("checkpoint") else "")
        + f"), backend {report['model']['backend']}",
        f"- prompts: `{report['prompts']['file']}` ({report['prompts']['count']} prompts)",
        f"- sampling: n={s['n']}, temperature={s['temperature']}, top_p={s['top_p']}, top_k={s['top_k']}, "
        f"max_tokens={s['max_tokens']}, seed={s['seed']}",
        f"- reward: `{r['function']}` (correct = reward > {r['pass_threshold']}); scored {r['scored']} of "
        f"{r['samples']} samples, {r['failed']} failed, mean reward {_fmt(r['mean'])}",
        "",
        "| k | pass@k | prompts |",
        "| --- | --- | --- |",
        *(f"| {k} | {_fmt(v['value'])} | {v['prompts']} |" for k, v in report["pass_at_k"].items()),
        "",
        f"Sample accuracy {_fmt(acc['value'])} ({acc['correct']}/{acc['scored']}), Wilson 95 % "
        + (f"[{acc['wilson95'][0]:.4f}, {acc['wilson95'][1]:.4f}]" if acc["wilson95"] else "n/a")
        + " (samples taken as independent trials).",
        "",
    ]
    d = report["diversity"]
    lines += [
        f"Diversity: distinct answers share {_fmt(d['distinct_answers_share'])} ({d['answers']} answers), "
        f"distinct-1 {_fmt(d['distinct_1'])}, distinct-2 {_fmt(d['distinct_2'])}; mean response "
        f"{_fmt(report['responses']['tokens_mean'], 1)} tokens, {_fmt(report['responses']['truncated_share'])} "
        f"cut at max_tokens.",
        "",
    ]
    t = report["teacher"]
    if t is not None:
        lines += [
            f"## Teacher `{t['model_name']}` at {', '.join(t['addresses'])} (top-k {t['top_k']}, {t['tokens']} tokens)",
            "",
            "| metric | value | what |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {name} | {_fmt(m['value'])} | {m['description']} |" for name, m in t["metrics"].items()]
        lines += ["", t["note"], ""]
    lines += ["## Prompts", "", "| prompt | reference | correct / scored | answers |", "| --- | --- | --- | --- |"]
    for row in report["per_prompt"][:MAX_PROMPT_ROWS]:
        answers = ", ".join(f"`{a}`" for a in row["answers"][:4]) or "-"
        lines.append(
            f"| {row['prompt_id']} | {row['reference'] or '-'} | {row['correct']} / {row['scored']} | {answers} |"
        )
    if len(report["per_prompt"]) > MAX_PROMPT_ROWS:
        lines.append(f"\n({len(report['per_prompt']) - MAX_PROMPT_ROWS} more in eval.json)")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, report: dict[str, Any], samples: Sequence[EvalSample], threshold: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = _finite(report)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out_dir / "eval.md").write_text(render_markdown(report))
    with (out_dir / "samples.jsonl").open("w") as f:
        for s in samples:
            row = {
                "prompt_id": s.prompt_id,
                "index": s.index,
                "seed": s.seed,
                "reward": s.reward,
                "correct": is_correct(s, threshold),
                "reward_error": s.reward_error,
                "answer": s.answer,
                "finish_reason": s.finish_reason,
                "response_tokens": len(s.response_ids),
                "text": s.text,
                "teacher": s.teacher,
            }
            f.write(json.dumps(_finite(row), allow_nan=False) + "\n")
