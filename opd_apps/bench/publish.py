"""`opd bench publish`: full-weight vs LoRA students, from the end of a step to a worker sampling the new version.

Owns the full-weights vs LoRA publish measurement. For each worker backend (`--backends`: hf, the CPU vLLM) and
each kind of student (full weights; LoRA of `--lora-rank` on every linear projection of the decoder), in its own
process so the peaks are its own: a trainer-side student (FSDP2 on one CPU process, as `opd train` runs it) trains
`--steps` steps on a synthetic packed micro-batch (`--tokens`), then publishes versions as the trainer does
(`student_trainer.publish.publish_weights`), and a worker backend in the same process loads each as a worker does
on an announcement (`load_policy`, or `load_adapter` for LoRA) and generates. Reported per backend and kind:
bytes per version, seconds from the end of the step to the worker's first token with the new version (publish +
load + one token, each part too; the best of `--reloads` versions), worker generation tokens/s (greedy,
`--gen-tokens`), trainer peak RSS and step time; then the full/LoRA ratios. `--repeats` runs the whole set again,
interleaved (full, LoRA, full, LoRA, ...), and reports medians. No Redis: the announcement itself (one small
message) is not timed. The vLLM engine runs eager (no compilation) for both kinds. The hf worker merges the
adapter into its weights (`engine.hf_lora: merged`); `--hf-lora merged peft` adds a LoRA run served through
peft's wrapper.

    opd bench publish                                  # a random 4-layer student (hidden 256)
    opd bench publish --model /models/student          # e.g. the demo's student
    opd bench publish --model demo                     # the demo's 24-layer SmolLM2 student (built once)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from opd_apps.bench.common import run_isolated


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="opd bench publish", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        help="student model directory, or `demo` (the demo's student; default: a random 4-layer, hidden-256 "
        "Qwen2 student)",
    )
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--tokens", type=int, default=512, help="tokens in the training micro-batch")
    p.add_argument("--steps", type=int, default=3, help="training steps (the fastest is reported)")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens generated for the worker's tokens/s")
    p.add_argument("--reloads", type=int, default=3, help="versions published and loaded (the fastest is reported)")
    p.add_argument("--backends", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"], help="worker backends")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of the whole set (medians reported)")
    p.add_argument(
        "--hf-lora",
        nargs="+",
        choices=["merged", "peft"],
        default=["merged"],
        help="how the hf worker serves the adapter (`engine.hf_lora`); both: a LoRA run of each",
    )
    p.add_argument("--timeout-s", type=float, default=1800, help="limit per kind of student")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="opd-bench-publish-") as tmp:
        model = _model(args.model, Path(tmp))
        runs: dict[tuple[str, str], list[dict]] = {}
        for repeat in range(args.repeats):
            for backend in args.backends:
                for kind, rank, hf_lora in _kinds(backend, args):
                    out = Path(tmp) / f"{backend}-{kind}-{repeat}"
                    spec = {**vars(args), "model": str(model), "rank": rank, "backend": backend, "out": str(out)}
                    spec["hf_lora"] = hf_lora
                    result = _run_isolated(spec, args.timeout_s)
                    runs.setdefault((backend, kind), []).append(result)
                    print(f"{backend} {kind} #{repeat}: {json.dumps(result)}", flush=True)
    for backend in args.backends:
        kinds = [kind for kind, _, _ in _kinds(backend, args)]
        _report(backend, {kind: _median(runs[(backend, kind)]) for kind in kinds}, args, model)
    return 0 if all(r.get("status") == "ok" for rs in runs.values() for r in rs) else 1


def _kinds(backend: str, args: argparse.Namespace) -> list[tuple[str, int, str]]:
    """(kind, LoRA rank, hf_lora) of each run: full weights, then LoRA (hf: once per `--hf-lora` mode)."""
    modes = args.hf_lora if backend == "hf" else ["merged"]
    lora = [("lora" if mode == "merged" else f"lora-{mode}", args.lora_rank, mode) for mode in modes]
    return [("full", 0, "merged"), *lora]


def _model(name: str | None, tmp: Path) -> Path:
    if name == "demo":
        from opd_apps.demo.models import demo_models

        return demo_models()[1]
    return Path(name) if name else _random_student(tmp / "student")


def _median(results: list[dict]) -> dict:
    ok = [r for r in results if r.get("status") == "ok"]
    if not ok:
        return results[0]
    return {"status": "ok", **{k: statistics.median(r[k] for r in ok) for k in ok[0] if k != "status"}}


def _random_student(path: Path) -> Path:
    from opd_apps.demo.models import build_tiny_model

    return build_tiny_model(path, num_layers=4, hidden_size=256)


def _run_isolated(spec: dict, timeout_s: float) -> dict:
    return run_isolated(["opd_apps.bench.publish_one", json.dumps(spec)], timeout_s)


def _report(backend: str, results: dict[str, dict], args: argparse.Namespace, model: str | Path) -> None:
    """One table: full weights, then each LoRA kind, and full / LoRA for each."""
    full = results["full"]
    loras = [kind for kind in results if kind != "full"]
    print(
        f"\n{backend} worker; student {model}; LoRA rank {args.lora_rank} on all linear projections; "
        f"medians of {args.repeats}; load average {os.getloadavg()}"
    )
    rows = (
        ("bytes per version", "version_bytes", "{:,.0f}"),
        ("end of step -> worker's first token (s)", "turnaround_s", "{:.3f}"),
        ("  publish: gather + write (s)", "publish_s", "{:.3f}"),
        ("  worker load (s)", "load_s", "{:.3f}"),
        ("  first token (s)", "first_token_s", "{:.3f}"),
        ("worker generation (tokens/s)", "gen_tokens_per_s", "{:.1f}"),
        ("trainer peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
        ("trainer step (s)", "step_s", "{:.3f}"),
        ("worker start (s)", "backend_start_s", "{:.1f}"),
    )
    failed = [f"{kind}: {r.get('status')}" for kind, r in results.items() if r.get("status") != "ok"]
    if failed:
        print("; ".join(failed))
        return
    header = " | ".join(f"{k:>14} | {'full / ' + k:>16}" for k in loras)
    print(f"| {'measure':40} | {'full':>14} | {header} |")
    for label, key, fmt in rows:
        if any(key not in r for r in results.values()):
            continue
        cells = []
        for kind in loras:
            value = results[kind][key]
            ratio = full[key] / value if value else float("inf")
            cells.append(f"{fmt.format(value):>14} | {ratio:>16.2f}")
        print(f"| {label:40} | {fmt.format(full[key]):>14} | {' | '.join(cells)} |")


if __name__ == "__main__":
    raise SystemExit(main())
