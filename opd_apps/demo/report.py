"""The demo's closing report: did the skill move from teacher to student, how fast, and a plot.

Reads what the trainer wrote beside its checkpoints (`evals.jsonl`,
`steps.jsonl`), scrapes the teacher's and rollout workers' metrics, runs the
before/after evaluation of `opd_apps.demo.heldout` on the held-out prompts
(teacher as the ceiling, student before and after training), checks the
demo's two goals, and writes `report.md`, `report.json` and `curves.png`
into the run directory.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

SCORE_GOAL = 0.5  # the trained student closes at least this share of the gap from its start to the teacher
DIVERGENCE_GOAL = -0.5  # held-out divergence change (after / before - 1) at or below this
TRAIN_BUDGET_S = 600  # training (all processes ready -> trainer done) on an idle 2-core machine


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def metric_sum(url: str, name: str) -> float:
    """Sum of a Prometheus metric's samples at `url` (NaN when the endpoint does not answer)."""
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return math.nan
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _interval(value: float | None, low: float, high: float) -> str:
    return f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]"


def evaluate(plan, ports: dict[str, int], final_weights: Path | None) -> dict[str, Any]:
    """The held-out evaluation of teacher, student before and student after (`opd_apps.demo.heldout`)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from opd_apps.demo.heldout import (
        agreement_per_item,
        evaluate_model,
        fetch_teacher_scores,
        forced_sequences,
        load_items,
    )

    hf_logging.disable_progress_bar()  # no "Loading weights" bars in the printed report
    tokenizer = AutoTokenizer.from_pretrained(plan.student)
    items = load_items(plan.heldout, tokenizer, plan.heldout_limit)
    teacher, answers, _ = evaluate_model("teacher", plan.teacher, tokenizer, items, plan.max_tokens, plan.shown)
    sequences = forced_sequences(items, answers)
    replies = fetch_teacher_scores(f"127.0.0.1:{ports['grpc']}", sequences)
    models = {"teacher": teacher}
    students = [("student before", plan.student)] + ([("student after", final_weights)] if final_weights else [])
    for label, path in students:
        result, _, model = evaluate_model(label, path, tokenizer, items, plan.max_tokens, plan.shown, plan.student)
        result.agreement = agreement_per_item(model, replies, sequences)
        models[label] = result
    return {"items": items, "models": models}


def goals(models: dict, first: dict, last: dict) -> dict[str, Any]:
    """The demo's two goals, from the held-out numbers: task score halfway to the teacher, divergence -50%."""
    out: dict[str, Any] = {}
    if "student after" in models:
        start, end = models["student before"].score()["score"], models["student after"].score()["score"]
        ceiling = models["teacher"].score()["score"]
        target = start + SCORE_GOAL * (ceiling - start)
        gap = ceiling - start
        out["score"] = {
            "start": start,
            "end": end,
            "teacher": ceiling,
            "target": target,
            "share_of_gap": (end - start) / gap if gap > 0 else math.nan,
            "met": gap > 0 and end >= target,
        }
    if first.get("divergence") and last.get("divergence") is not None and last is not first:
        change = last["divergence"] / first["divergence"] - 1
        out["divergence"] = {
            "before": first["divergence"],
            "after": last["divergence"],
            "change": change,
            "met": change <= DIVERGENCE_GOAL,
        }
    return out


def _model_table(models: dict) -> list[str]:
    lines = [
        "| model | task score [95% CI] | top-1 agreement with the teacher [95% CI] | distinct answers | distinct-1 "
        "| distinct-2 |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for label, result in models.items():
        s, agreement, d = result.score(), result.top1_agreement(), result.diversity()
        agree = (
            "(its own answers)"
            if agreement is None
            else _interval(agreement["value"], agreement["low"], agreement["high"])
        )
        label = "teacher (ceiling)" if label == "teacher" else label
        lines.append(
            f"| {label} | {s['correct']}/{s['items']} = {_interval(s['score'], s['low'], s['high'])} | {agree} "
            f"| {_fmt(d['distinct_answers'], 2)} | {_fmt(d['distinct_1'], 2)} | {_fmt(d['distinct_2'], 2)} |"
        )
    return lines


def _goal_lines(g: dict) -> list[str]:
    lines = []
    if "score" in g:
        s = g["score"]
        closed = (
            f"the student closed {_fmt(100 * s['share_of_gap'], 0)}% of the gap"
            if s["teacher"] > s["start"]
            else "the teacher does not score above the student's start: there is no gap to close"
        )
        lines.append(
            f"- Task score: {_fmt(s['start'])} -> {_fmt(s['end'])} (teacher {_fmt(s['teacher'])}); {closed}; goal "
            f"at least {100 * SCORE_GOAL:.0f}% (score >= {_fmt(s['target'])}): **{'met' if s['met'] else 'NOT met'}**."
        )
    if "divergence" in g:
        d = g["divergence"]
        lines.append(
            f"- Divergence: {_fmt(d['before'])} -> {_fmt(d['after'])} nats/token ({_fmt(100 * d['change'], 1)}%); "
            f"goal {100 * DIVERGENCE_GOAL:.0f}% or better: **{'met' if d['met'] else 'NOT met'}**."
        )
    if "training_time" in g:
        t = g["training_time"]
        lines.append(
            f"- Training time: {_fmt(t['train_s'], 0)} s (start-up and model conversion apart); budget "
            f"{t['budget_s']} s on an idle 2-core machine: **{'met' if t['met'] else 'NOT met'}** "
            "(see the load average above)."
        )
    return lines


def _sample_lines(evaluation: dict, temperature: float, seeds: tuple[int, ...]) -> list[str]:
    lines = [
        f"Greedy, and sampled at temperature {temperature} with seeds {', '.join(map(str, seeds))} (top-k and top-p "
        "off), with transformers.",
        "",
    ]
    models = evaluation["models"]
    for item in evaluation["items"]:
        if item.prompt_id not in models["teacher"].samples:
            continue
        lines += [f"**{item.prompt}** (reference: {item.answer})", ""]
        for label, result in models.items():
            for kind, text in result.samples.get(item.prompt_id, {}).items():
                lines.append(f"- {label}, {kind}: {text!r}")
        lines.append("")
    return lines


def _plot(steps: list[dict], evals: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    xs = [s["step"] for s in steps]
    series = [
        ("divergence to the teacher (train)", [s["stats"].get("mean_divergence") for s in steps]),
        ("loss", [s["stats"].get("loss") for s in steps]),
    ]
    for ax, (title, ys) in zip(axes.flat, series, strict=False):
        ax.plot(xs, [math.nan if y is None else y for y in ys], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
    eval_steps = [e["step"] for e in evals]
    ax = axes.flat[2]
    ax.plot(eval_steps, [e.get("divergence") or math.nan for e in evals], marker="o")
    ax.set_title("held-out divergence (nats/token, sampled reverse KL)")
    ax.set_xlabel("step")
    ax = axes.flat[3]
    ax.plot(eval_steps, [_nan(e.get("pass_at_1")) for e in evals], marker="s", label="pass@1 (temperature 1)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("held-out task score (eval rounds)")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def write_report(run_dir: Path, plan, ports: dict[str, int], timings: dict[str, float]) -> Path:
    """Evaluate, write report.md / report.json / curves.png under `run_dir`, print the report; returns its path."""
    from opd_apps.demo.heldout import SAMPLE_SEEDS, SAMPLE_TEMPERATURE

    started = time.monotonic()
    steps = _jsonl(run_dir / "checkpoints" / "steps.jsonl")
    evals = [e for e in _jsonl(run_dir / "checkpoints" / "evals.jsonl") if e.get("divergence") is not None]
    weights = sorted((run_dir / "weights").glob("v*"))
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    teacher_tokens = metric_sum(f"http://127.0.0.1:{ports['teacher_ops']}/metrics", "opd_teacher_scored_tokens_total")
    rollout_tokens = metric_sum(f"http://127.0.0.1:{ports['worker_ops']}/metrics", "opd_rollout_generated_tokens_total")
    evaluation = evaluate(plan, ports, weights[-1] if weights else None)
    models = evaluation["models"]
    g = goals(models, first, last)
    timings = {**timings, "report_s": time.monotonic() - started}
    train_s = timings.get("train_s", math.nan)
    g["training_time"] = {"train_s": train_s, "budget_s": TRAIN_BUDGET_S, "met": train_s <= TRAIN_BUDGET_S}
    lines = [
        "# opd demo report",
        "",
        f"{len(steps)} steps on {os.cpu_count()} CPU cores; run directory `{run_dir}`.",
        "",
        f"- teacher: `{plan.teacher}`",
        f"- student: `{plan.student}`"
        + (
            f" with LoRA adapters (rank {plan.lora_rank}, alpha {2 * plan.lora_rank}, every linear projection of the "
            "decoder; each published version is the adapter)"
            if plan.lora_rank
            else " (full weights trained and published)"
        ),
        f"- recipe: {plan.groups_per_step} prompts x {plan.samples} samples per step, up to {plan.max_tokens} "
        f"tokens, forward KL over the teacher's top-{plan.top_k} + tail, lr {plan.lr:g} "
        f"({plan.warmup_steps} warm-up steps), eval rounds every {plan.eval_every} steps",
        "",
        "| phase | seconds |",
        "| --- | ---: |",
        *(
            f"| {name} | {timings[key]:.0f} |"
            for key, name in (
                ("prepare_s", "preparing the models (conversion, cached after the first run)"),
                ("startup_s", "starting Redis, teacher, rollout workers, trainer (until all report ready)"),
                ("train_s", "training (ready -> trainer done, its eval rounds included)"),
                ("report_s", "this report's evaluation"),
            )
            if key in timings
        ),
        "",
        f"Load average (1 min): {timings.get('load_start', math.nan):.1f} at the start, "
        f"{timings.get('load_train_max', math.nan):.1f} at most while training, {os.getloadavg()[0]:.1f} at the end "
        "(the demo's own three processes alone make about 2).",
        "",
        "## Goals",
        "",
        *_goal_lines(g),
        "",
        f"## Held-out prompts: teacher, student before, student after ({len(evaluation['items'])} prompts, greedy)",
        "",
        "Task score: share of greedy answers whose first line holds the reference plural (95% Wilson interval). "
        "Top-1 agreement: under teacher forcing on the teacher's own greedy answers, the share of answer positions "
        "where the model's most likely token is the teacher's (95% bootstrap over prompts). Diversity across "
        "prompts: share of distinct answers (first line), distinct-1/2 over their words.",
        "",
        *_model_table(models),
        "",
        *_baseline_lines(plan, models, g, timings),
        "## Divergence on the eval-round prompts (trainer, samples at temperature 1)",
        "",
        "| | step | divergence to teacher (nats/token) | pass@1 | samples |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {label} | {e.get('step', 'n/a')} | {_fmt(e.get('divergence'))} | {_fmt(e.get('pass_at_1'), 2)} "
            f"| {_fmt(e.get('samples'), 0)} |"
            for label, e in (("before", first), ("after", last))
        ),
        "",
        "## Samples",
        "",
        *_sample_lines(evaluation, SAMPLE_TEMPERATURE, SAMPLE_SEEDS),
        "## Throughput (over the training phase)",
        "",
        f"- teacher: {teacher_tokens / train_s:,.0f} positions scored / s",
        f"- rollout workers: {rollout_tokens / train_s:,.0f} tokens sampled / s",
        f"- trainer: {sum(s['stats'].get('tokens') or 0 for s in steps) / train_s:,.0f} trained tokens / s",
        "",
    ]
    if steps:
        _plot(steps, evals, run_dir / "curves.png")
        lines += ["![curves](curves.png)", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    summary = {"student": {"lora_rank": plan.lora_rank, "lr": plan.lr}, **_summary(models, g, timings, first, last)}
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines), flush=True)
    return report


def _baseline_lines(plan, models: dict, g: dict, timings: dict) -> list[str]:
    """This run's student after training beside another run's (`--baseline-report`, e.g. full weights beside
    LoRA): task score, top-1 agreement, held-out divergence, training time."""
    if plan.baseline_report is None or "student after" not in models:
        return []
    other = json.loads(Path(plan.baseline_report).read_text())
    after = models["student after"]
    rows = [
        (
            _kind(plan.lora_rank) + " (this run)",
            after.score(),
            after.top1_agreement(),
            g.get("divergence", {}),
            timings.get("train_s"),
        ),
        (
            _kind(other.get("student", {}).get("lora_rank", 0)) + f" (`{plan.baseline_report}`)",
            other["models"]["student after"]["task_score"],
            other["models"]["student after"]["top1_agreement"],
            other["goals"].get("divergence", {}),
            other["timings_s"].get("train_s"),
        ),
    ]
    lines = [
        "## Student after training, beside the baseline run",
        "",
        "| student | task score [95% CI] | top-1 agreement [95% CI] | divergence before -> after (nats/token) "
        "| training (s) |",
        "| --- | --- | --- | --- | ---: |",
    ]
    for label, s, a, d, train_s in rows:
        agree = "n/a" if a is None else _interval(a["value"], a["low"], a["high"])
        div = f"{_fmt(d.get('before'))} -> {_fmt(d.get('after'))} ({_fmt(100 * _nan(d.get('change')), 1)}%)"
        lines.append(
            f"| {label} | {s['correct']}/{s['items']} = {_interval(s['score'], s['low'], s['high'])} | {agree} "
            f"| {div} | {_fmt(train_s, 0)} |"
        )
    return [*lines, ""]


def _kind(lora_rank: int) -> str:
    return f"LoRA rank {lora_rank}" if lora_rank else "full weights"


def _summary(models: dict, g: dict, timings: dict, first: dict, last: dict) -> dict[str, Any]:
    return {
        "timings_s": timings,
        "goals": g,
        "divergence": {"before": first, "after": last},
        "models": {
            label: {"task_score": r.score(), "top1_agreement": r.top1_agreement(), "diversity": r.diversity()}
            for label, r in models.items()
        },
    }
