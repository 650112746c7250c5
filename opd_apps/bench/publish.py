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
message) is not timed. The vLLM engine runs eager (no compilation) for both kinds.

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
    p.add_argument("--timeout-s", type=float, default=1800, help="limit per kind of student")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="opd-bench-publish-") as tmp:
        model = _model(args.model, Path(tmp))
        runs: dict[tuple[str, str], list[dict]] = {}
        for repeat in range(args.repeats):
            for backend in args.backends:
                for kind, rank in (("full", 0), ("lora", args.lora_rank)):
                    out = Path(tmp) / f"{backend}-{kind}-{repeat}"
                    spec = {**vars(args), "model": str(model), "rank": rank, "backend": backend, "out": str(out)}
                    result = _run_isolated(spec, args.timeout_s)
                    runs.setdefault((backend, kind), []).append(result)
                    print(f"{backend} {kind} #{repeat}: {json.dumps(result)}", flush=True)
    for backend in args.backends:
        _report(backend, {kind: _median(runs[(backend, kind)]) for kind in ("full", "lora")}, args, model)
    return 0 if all(r.get("status") == "ok" for rs in runs.values() for r in rs) else 1


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


def _report(backend: str, results: dict, args: argparse.Namespace, model: str | Path) -> None:
    full, lora = results["full"], results["lora"]
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
    )
    print(f"| {'measure':40} | {'full':>14} | {'LoRA':>14} | {'full / LoRA':>11} |")
    for label, key, fmt in rows:
        if full.get("status") != "ok" or lora.get("status") != "ok":
            print(f"full: {full.get('status')}; LoRA: {lora.get('status')}")
            break
        ratio = full[key] / lora[key] if lora[key] else float("inf")
        print(f"| {label:40} | {fmt.format(full[key]):>14} | {fmt.format(lora[key]):>14} | {ratio:>11.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
