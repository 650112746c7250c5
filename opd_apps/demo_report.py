"""The demo's closing report: before/after on held-out prompts, samples, throughput, and a plot.

Reads what the trainer wrote beside its checkpoints (`evals.jsonl`,
`steps.jsonl`), asks the still-running teacher for its answers (`Generate`),
samples the student before and after training (greedy, transformers), scrapes
the teacher's and rollout workers' metrics, and writes `report.md` and
`curves.png` into the run directory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _metric_sum(url: str, name: str) -> float:
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return math.nan
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


SAMPLE_TEMPERATURE, SAMPLE_SEED = 0.7, 0


def _sample(model_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """One sample at SAMPLE_TEMPERATURE with a fixed seed (greedy decoding of a small student mostly repeats one
    token, which says little about what it learned)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(SAMPLE_SEED)
    config = GenerationConfig(
        do_sample=True, temperature=SAMPLE_TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=max_tokens
    )
    with torch.no_grad():
        mask = torch.ones(1, len(prompt_ids), dtype=torch.long)
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=mask, generation_config=config)
    return out[0, len(prompt_ids) :].tolist()


def _samples(plan, ports: dict[str, int], final_weights: Path | None, n: int = 3) -> list[dict[str, str]]:
    from importlib.resources import files

    from transformers import AutoTokenizer

    from teacher_server.client import TeacherClientSync

    tokenizer = AutoTokenizer.from_pretrained(plan.student)
    rows = [json.loads(line) for line in (files("opd_apps") / "data" / "demo_eval.jsonl").read_text().splitlines()]
    rows = rows[:n]
    out = []
    with TeacherClientSync(f"127.0.0.1:{ports['grpc']}", client_name="demo-report") as teacher:
        for row in rows:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": row["prompt"]}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
            gen = teacher.generate(ids, max_tokens=plan.max_tokens, temperature=SAMPLE_TEMPERATURE, seed=SAMPLE_SEED)
            before = _sample(plan.student, ids, plan.max_tokens)
            after = _sample(final_weights, ids, plan.max_tokens) if final_weights else []
            out.append(
                {
                    "prompt": row["prompt"],
                    **{
                        k: tokenizer.decode(v, skip_special_tokens=True).strip()
                        for k, v in (
                            ("teacher", gen.token_ids.tolist()),
                            ("student before", before),
                            ("student after", after),
                        )
                    },
                }
            )
    return out


def _plot(steps: list[dict], evals: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    xs = [s["step"] for s in steps]
    series = [
        ("divergence to the teacher (train)", [s["stats"].get("mean_divergence") for s in steps]),
        ("loss", [s["stats"].get("loss") for s in steps]),
        ("trained tokens / s", [s.get("tokens_per_s") for s in steps]),
    ]
    for ax, (title, ys) in zip(axes.flat, series, strict=False):
        ax.plot(xs, [math.nan if y is None else y for y in ys], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
    ax = axes.flat[3]
    ax.plot(
        [e["step"] for e in evals],
        [e.get("divergence") or math.nan for e in evals],
        marker="o",
        label="divergence (nats/token)",
    )
    rewards = [e.get("mean_reward") for e in evals]
    if any(r is not None for r in rewards):
        ax.plot(
            [e["step"] for e in evals], [math.nan if r is None else r for r in rewards], marker="s", label="mean reward"
        )
    ax.set_title("held-out prompts")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dir: Path, plan, ports: dict[str, int], wall_s: float) -> Path:
    steps = _jsonl(run_dir / "checkpoints" / "steps.jsonl")
    evals = _jsonl(run_dir / "checkpoints" / "evals.jsonl")
    weights = sorted((run_dir / "weights").glob("v*"))
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    drop = (1 - last["divergence"] / first["divergence"]) if evals and first.get("divergence") else math.nan
    teacher_tokens = _metric_sum(f"http://127.0.0.1:{ports['teacher_ops']}/metrics", "opd_teacher_scored_tokens_total")
    rollout_tokens = _metric_sum(
        f"http://127.0.0.1:{ports['worker_ops']}/metrics", "opd_rollout_generated_tokens_total"
    )
    step_s = sum(
        (s["stats"].get("teacher_wait_s") or 0)
        + (s["stats"].get("data_wait_s") or 0)
        + (s["stats"].get("compute_s") or 0)
        for s in steps
    )
    trained = sum(s["stats"].get("tokens") or 0 for s in steps)
    lines = [
        "# opd demo report",
        "",
        f"{len(steps)} steps in {wall_s:.0f} s (wall, start-up included) on {os.cpu_count()} CPU cores "
        f"(load average {os.getloadavg()[0]:.1f} at the end); run directory `{run_dir}`.",
        "",
        "## Held-out prompts, before and after",
        "",
        "| | step | divergence to teacher (nats/token) | pass@1 | mean reward |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, e in (("before", first), ("after", last)):
        lines.append(
            f"| {label} | {e.get('step', 'n/a')} | {_fmt(e.get('divergence'))} "
            f"| {_fmt(e.get('pass_at_1'), 2)} | {_fmt(e.get('mean_reward'), 2)} |"
        )
    lines += [
        "",
        f"Divergence change: {_fmt(-100 * drop, 1)}% (goal: at least -30%).",
        "",
        f"## Samples (temperature {SAMPLE_TEMPERATURE}, seed {SAMPLE_SEED}; the teacher's through its `Generate` RPC)",
        "",
    ]
    for sample in _samples(plan, ports, weights[-1] if weights else None):
        lines += (
            [f"**{sample['prompt']}**", ""]
            + [f"- {k}: {sample[k]!r}" for k in ("teacher", "student before", "student after")]
            + [""]
        )
    lines += [
        "## Throughput (over the whole run)",
        "",
        f"- teacher: {teacher_tokens / wall_s:,.0f} positions scored / s",
        f"- rollout workers: {rollout_tokens / wall_s:,.0f} tokens sampled / s",
        f"- trainer: {trained / max(step_s, 1e-9):,.0f} trained tokens / s of step time",
        "",
    ]
    if steps:
        _plot(steps, evals, run_dir / "curves.png")
        lines += ["![curves](curves.png)", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    print("\n".join(lines), flush=True)
    return report
