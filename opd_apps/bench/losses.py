"""`opd bench losses`: peak extra memory and time of one forward+backward.

Owns the losses benchmark (results in BENCHMARKS.md). For each divergence (reverse KL, JSD)
and size (N tokens, vocabulary V, hidden H) it measures, each in its own
subprocess under a memory cap (an allocation past the cap is reported as
`out of memory` instead of taking the benchmark or the machine down):

  (a) full:       full [N, V] logits, one plain loss over the whole tensor;
  (b) seed:       full [N, V] logits, log_softmax + divergence over row chunks
                  (512 rows; 256 for JSD) summed, one backward at the end;
  fused:          `compute_distillation_loss`, full teacher log-probs (same input as a, b);
                  its block math compiled on CUDA (`loss.compile=auto`);
  fused_eager:    the same with the eager PyTorch block math (`loss.compile=off`; on CPU
                  `fused` is already eager, so only CUDA runs it by default);
  fused_topk:     `compute_distillation_loss`, teacher top-k + tail (what the service sends);
  fused_tiled:    `fused` with the tiled schedule (`loss.chunking=tiles`: row blocks x
                  vocabulary tiles), whatever the default schedule is.

`--grad-error` instead reports the relative error of the bf16 lm-head weight
gradient against a float64 one (reverse KL, full teacher): one bf16 matmul
over all rows, the row-chunk schedule (bf16 sums across chunks) and the tiled
schedule (float32 sums per vocabulary tile).

Peak extra memory is the growth of peak RSS during the step on CPU (VmHWM,
reset through /proc/self/clear_refs) or `torch.cuda.max_memory_allocated`
growth on CUDA; it includes the weight gradient every method produces.
Inputs (hidden, lm-head weight, teacher scores) exist before the step and are
not counted. On CPU every method runs under the trainer's CPU settings
(`student_trainer.model.tune_cpu_runtime`: denormals flushed, a fixed malloc
mmap threshold). Time is the median of CUDA-event timings on CUDA (default 20
steps after a full-size warm-up, which also compiles), the best wall time on
CPU (default 2 steps). It prints a markdown table and one `ratio` line per
size, each against (b) measured in the same run. Needs torch, pydantic and
this repository only (no Redis, gRPC or HTTP packages).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import threading
import time
from pathlib import Path

from opd_apps.bench.common import run_isolated

METHODS = ("full", "seed", "fused", "fused_eager", "fused_topk", "fused_tiled")
LABELS = {
    "full": "(a) full logits",
    "seed": "(b) seed chunks",
    "fused": "fused (full teacher)",
    "fused_eager": "fused eager (full teacher)",
    "fused_topk": "fused (top-k teacher)",
    "fused_tiled": "fused tiled (full teacher)",
}
FUSED_FULL = ("fused", "fused_eager", "fused_tiled")  # the methods with a ratio line against (b)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opd bench losses", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--n", type=int, nargs="+", help="token counts N (default 1024 4096)")
    p.add_argument("--v", type=int, nargs="+", help="vocabulary sizes V (default 49152 151936)")
    p.add_argument("--hidden", type=int, help="hidden size H (default 1024)")
    p.add_argument("--losses", nargs="+", choices=("rkl", "jsd"), default=["rkl", "jsd"], help="divergences")
    p.add_argument(
        "--methods", nargs="+", choices=METHODS, help="methods to measure (default: all; fused_eager on CUDA only)"
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="fused rows per chunk (default: LossConfig.chunk_budget_mib of fp32 per chunk)",
    )
    p.add_argument(
        "--block-budget-mib", type=float, default=None, help="fused block temporaries (default: LossConfig's)"
    )
    p.add_argument(
        "--chunking", choices=("rows", "tiles"), default=None, help="schedule of `fused` (default: LossConfig's)"
    )
    p.add_argument("--tile-vocab", type=int, default=None, help="tiled: vocabulary tile (default: LossConfig's)")
    p.add_argument(
        "--tile-budget-mib", type=float, default=None, help="tiled: fp32 MiB of one tile (default: LossConfig's)"
    )
    p.add_argument("--grad-error", action="store_true", help="report the bf16 weight-gradient error instead")
    p.add_argument("--top-k", type=int, default=64, help="teacher top-k of fused_topk")
    p.add_argument("--memory-cap-gib", type=float, default=16.0, help="cap on extra memory per configuration")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="wall-clock limit per configuration")
    p.add_argument(
        "--repeats",
        type=int,
        help="timed steps per configuration: worst peak; best wall time on CPU, median CUDA-event time on CUDA "
        "(default 2 on CPU, 20 on CUDA)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="hidden/weight dtype")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run defaults: N 256, V 4096 and 8192, H 64, one repeat (explicit flags still win)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    repeats = 20 if args.device == "cuda" else 2
    defaults = ([256], [4096, 8192], 64, 1) if args.quick else ([1024, 4096], [49152, 151936], 1024, repeats)
    for name, default in zip(("n", "v", "hidden", "repeats"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.methods is None:
        args.methods = [m for m in METHODS if m != "fused_eager" or args.device == "cuda"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        print("RESULT " + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.grad_error:
        return _grad_error_report(args)
    timing = "median CUDA-event time" if args.device == "cuda" else "best wall time"
    print(
        f"# opd bench losses: device={_device_name(args.device)} H={args.hidden} dtype={args.dtype} "
        f"cap={args.memory_cap_gib} GiB; per cell {args.repeats} forward+backward steps in its own process "
        f"(worst peak, {timing})"
    )
    print("| loss | N | V | method | peak extra MiB | time ms | cpu s | memory vs (b) | time vs (b) | cpu vs (b) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ratios = []
    for loss in args.losses:
        for n in args.n:
            for v in args.v:
                results = {m: _run_isolated(args, loss, n, v, m) for m in args.methods}
                for method, res in results.items():
                    print(_row(loss, n, v, method, res, results.get("seed")), flush=True)
                ratios += [_ratio_line(loss, n, v, results, m) for m in FUSED_FULL if m in results]
    for line in ratios:
        print(line)
    return 0


def _run_isolated(args: argparse.Namespace, loss: str, n: int, v: int, method: str) -> dict:
    spec = {
        "loss": loss,
        "n": n,
        "v": v,
        "h": args.hidden,
        "method": method,
        "device": args.device,
        "chunk_size": args.chunk_size,
        "block_budget_mib": args.block_budget_mib,
        "chunking": args.chunking,
        "tile_vocab": args.tile_vocab,
        "tile_budget_mib": args.tile_budget_mib,
        "top_k": min(args.top_k, v),
        "cap_gib": args.memory_cap_gib,
        "dtype": args.dtype,
        "repeats": args.repeats,
    }
    return run_isolated(["opd_apps.bench.losses", "--worker", json.dumps(spec)], args.timeout_s)


def _row(loss: str, n: int, v: int, method: str, res: dict, seed: dict | None) -> str:
    if res["status"] != "ok":
        return f"| {loss} | {n} | {v} | {LABELS[method]} | {res['status']} | - | - | - | - | - |"
    ratios = ["-", "-", "-"]
    if seed and seed["status"] == "ok":
        ratios = [
            f"{seed['peak_extra_mib'] / max(res['peak_extra_mib'], 1e-9):.1f}x less",
            f"{res['time_s'] / seed['time_s']:.2f}x",
            f"{res['cpu_s'] / max(seed['cpu_s'], 1e-9):.2f}x",
        ]
    return (
        f"| {loss} | {n} | {v} | {LABELS[method]} | {res['peak_extra_mib']:.0f} | {1000 * res['time_s']:.1f} "
        f"| {res['cpu_s']:.2f} | {' | '.join(ratios)} |"
    )


def _ratio_line(loss: str, n: int, v: int, results: dict, method: str = "fused") -> str:
    seed, fused = results.get("seed"), results.get(method)
    head = f"ratio {loss} N={n} V={v} {method}:"
    if not fused or fused["status"] != "ok":
        return f"{head} {fused['status'] if fused else 'not run'}"
    if not seed or seed["status"] != "ok":
        return f"{head} (b) {seed['status'] if seed else 'not run'}; {method} {fused['peak_extra_mib']:.0f} MiB"
    return (
        f"{head} peak extra {fused['peak_extra_mib']:.0f} MiB vs (b) {seed['peak_extra_mib']:.0f} MiB "
        f"= {seed['peak_extra_mib'] / max(fused['peak_extra_mib'], 1e-9):.1f}x less; "
        f"time {1000 * fused['time_s']:.1f} ms vs {1000 * seed['time_s']:.1f} ms = "
        f"{fused['time_s'] / seed['time_s']:.2f}x; "
        f"cpu {fused['cpu_s']:.1f} s vs {seed['cpu_s']:.1f} s = {fused['cpu_s'] / max(seed['cpu_s'], 1e-9):.2f}x"
    )


# ----------------------------------------------------------------------------- worker (one configuration)


def _worker(spec: dict) -> dict:
    import statistics

    import torch

    device = torch.device(spec["device"])
    if device.type == "cpu":  # every method runs under the settings the trainer uses on CPU
        from student_trainer.model import tune_cpu_runtime

        tune_cpu_runtime()
    inputs = _make_inputs(spec, device)
    step = _make_step(spec, inputs)
    if device.type == "cuda":  # full size: kernels, cuBLAS workspaces and the compiled block math
        step()
        torch.cuda.synchronize()
    else:  # a small step: thread pools, kernels
        small = _make_inputs(dict(spec, n=64), device)
        _make_step(spec, small)()
        del small
    peaks, times, cpu_times = [], [], []
    for _ in range(spec["repeats"]):
        inputs["hidden"].grad = inputs["weight"].grad = None
        probe = _MemoryProbe(device, spec["cap_gib"])
        try:
            with probe:
                start, cpu_start = _Timer(device), _cpu_seconds()
                step()
                times.append(start.elapsed_s())
                cpu_times.append(_cpu_seconds() - cpu_start)
        except (MemoryError, torch.OutOfMemoryError):
            return {"status": "out of memory"}
        except RuntimeError as exc:
            if "alloc" in str(exc) or "memory" in str(exc):
                return {"status": "out of memory"}
            raise
        peaks.append(probe.peak_extra_bytes)
    # Worst peak; on CPU the best time (other processes on the machine only ever slow a run down), on CUDA the
    # median of the CUDA-event timings.
    time_s = statistics.median(times) if device.type == "cuda" else min(times)
    return {"status": "ok", "peak_extra_mib": max(peaks) / 2**20, "time_s": time_s, "cpu_s": min(cpu_times)}


class _Timer:
    """Elapsed time of the enclosed work: CUDA events on CUDA (kernel time, synchronised), wall time on CPU."""

    def __init__(self, device) -> None:
        import torch

        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def elapsed_s(self) -> float:
        import torch

        if not self.cuda:
            return time.perf_counter() - self.t0
        self.end.record()
        torch.cuda.synchronize()
        return self.start.elapsed_time(self.end) / 1000.0


def _device_name(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    return f"cuda ({torch.cuda.get_device_name()}, torch {torch.__version__})"


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (robust to other load on a shared CPU)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _make_inputs(spec: dict, device) -> dict:
    """Hidden, weight and teacher scores; the teacher form depends on the method."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    n, v, h = spec["n"], spec["v"], spec["h"]
    dtype = getattr(torch, spec["dtype"])
    hidden = torch.randn(n, h, generator=gen, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, device=device) / math.sqrt(h)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    out = {"hidden": hidden, "weight": weight, "targets": targets}
    rows = max(1, 2**24 // v)  # the teacher is made in row blocks of ~64 MiB
    if spec["method"] == "fused_topk":
        ids, topk, tail = [], [], []
        for start in range(0, n, rows):
            logp = torch.log_softmax(torch.randn(min(rows, n - start), v, generator=gen, device=device) * 2, -1)
            best = logp.topk(spec["top_k"], -1)
            ids.append(best.indices.int())
            topk.append(best.values)
            tail.append(logp.scatter(1, best.indices, -math.inf).logsumexp(-1))
        out.update(topk_ids=torch.cat(ids), topk_logprobs=torch.cat(topk), tail_logprobs=torch.cat(tail))
    else:
        full = torch.empty(n, v, device=device)
        for start in range(0, n, rows):
            block = torch.randn(min(rows, n - start), v, generator=gen, device=device) * 2
            full[start : start + rows] = torch.log_softmax(block, -1)
        out["teacher_full"] = full
    return out


def _make_step(spec: dict, inp: dict):
    """A closure running one forward + backward of the method."""
    method, loss = spec["method"], spec["loss"]
    if method in ("full", "seed"):
        rows = {"full": None, "seed": 256 if loss == "jsd" else 512}[method]
        return lambda: _baseline_loss(inp, loss, rows).backward()
    return lambda: _fused_loss(inp, spec, loss).backward()


def _divergence_sum(student_logp, teacher_logp, loss: str):
    """Sum over rows of KL(p_S || p_T) or JSD(0.5), written as TRL's generalized_jsd_loss does."""
    import torch
    import torch.nn.functional as F

    if loss == "rkl":
        return F.kl_div(teacher_logp, student_logp, reduction="sum", log_target=True)
    mixture = torch.logaddexp(student_logp + math.log(0.5), teacher_logp + math.log(0.5))
    return 0.5 * F.kl_div(mixture, teacher_logp, reduction="sum", log_target=True) + 0.5 * F.kl_div(
        mixture, student_logp, reduction="sum", log_target=True
    )


def _baseline_loss(inp: dict, loss: str, rows: int | None):
    """(a) rows=None: one loss over full logits; (b) per-chunk log_softmax + loss, summed."""
    import torch

    logits = (inp["hidden"] @ inp["weight"].T).float()
    teacher, n = inp["teacher_full"], logits.shape[0]
    if rows is None:
        return _divergence_sum(torch.log_softmax(logits, -1), teacher, loss) / n
    total = 0.0
    for start in range(0, n, rows):
        student = torch.log_softmax(logits[start : start + rows], -1)
        total = total + _divergence_sum(student, teacher[start : start + rows], loss)
    return total / n


def _fused_loss(inp: dict, spec: dict, loss: str):
    import torch

    from student_trainer.loss.compute import LossInputs, TeacherTensors, compute_distillation_loss
    from student_trainer.loss.config import LossConfig

    n = inp["hidden"].shape[0]
    topk = spec["method"] == "fused_topk"
    compile_mode = "off" if spec["method"] == "fused_eager" else "auto"
    chunking = "tiles" if spec["method"] == "fused_tiled" else spec.get("chunking")
    teacher = TeacherTensors(
        token_logprobs=torch.zeros(n, device=inp["hidden"].device),
        topk_ids=inp.get("topk_ids"),
        topk_logprobs=inp.get("topk_logprobs"),
        tail_logprobs=inp.get("tail_logprobs"),
        full_logprobs=inp.get("teacher_full"),
    )
    inputs = LossInputs(
        target_ids=inp["targets"],
        loss_weights=torch.ones(n, device=inp["hidden"].device),
        cu_seqlens=torch.tensor([0, n], device=inp["hidden"].device),
    )
    tiling = {k: spec.get(k) for k in ("tile_vocab", "tile_budget_mib") if spec.get(k) is not None}
    config = LossConfig.model_validate(
        {
            "divergence": loss,
            "support": "topk" if topk else "full",
            "chunk_size": spec["chunk_size"],
            "block_budget_mib": spec.get("block_budget_mib"),
            "compile": compile_mode,
            **({"chunking": chunking} if chunking else {}),
            **tiling,
        }
    )
    return compute_distillation_loss(inp["hidden"], inp["weight"], inputs, teacher, config, step=0)[0]


class _MemoryProbe:
    """Peak extra memory of the enclosed block, with allocations capped at `cap_gib` extra."""

    def __init__(self, device, cap_gib: float):
        self.device, self.cap_bytes = device, int(cap_gib * 2**30)
        self.peak_extra_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> _MemoryProbe:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            free, _total = torch.cuda.mem_get_info()
            torch.cuda.set_per_process_memory_fraction(min(1.0, (self._base + self.cap_bytes) / _total))
            return self
        self._base = _status_kib("VmRSS") * 1024
        resource.setrlimit(resource.RLIMIT_AS, (_status_kib("VmSize") * 1024 + self.cap_bytes, resource.RLIM_INFINITY))
        self._hwm_reset = _reset_peak_rss()
        self._sampled = self._base
        if not self._hwm_reset:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, _status_kib("VmRSS") * 1024)

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_extra_bytes = torch.cuda.max_memory_allocated() - self._base
            return
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        self._stop.set()
        peak = _status_kib("VmHWM") * 1024 if self._hwm_reset else self._sampled
        self.peak_extra_bytes = max(0, peak - self._base)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024


# ----------------------------------------------------------------------------- bf16 weight-gradient error


def _grad_error_report(args: argparse.Namespace) -> int:
    """Relative error of the bf16 weight gradient (reverse KL, full teacher) against float64, three ways."""
    import torch

    device = torch.device(args.device)
    n, v, h = args.n[0], args.v[0], args.hidden
    inp = _make_inputs({"n": n, "v": v, "h": h, "dtype": "bfloat16", "method": "fused"}, device)
    hidden, weight = inp["hidden"].detach(), inp["weight"].detach()
    logits = (hidden.double() @ weight.double().T).requires_grad_()
    _divergence_sum(torch.log_softmax(logits, -1), inp["teacher_full"].double(), "rkl").div(n).backward()
    dz = logits.grad
    del logits
    want = dz.T @ hidden.double()
    single = (dz.to(torch.bfloat16).T @ hidden).double()
    del dz
    got = {"one bf16 matmul over all rows (autograd on full logits)": single}
    block_mib = 256 * 4096 * 4 / 2**20  # 256-row blocks of 4096-wide tiles: sums across blocks
    schedules = (
        (f"row chunks of {args.chunk_size or 'default'} rows, bf16 sums across chunks", {"chunking": "rows"}),
        ("tiles, default shape, fp32 sums per tile", {"chunking": "tiles"}),
        ("tiles of 256 rows x 4096, fp32 sums per tile", {"chunking": "tiles", "tile_budget_mib": block_mib}),
    )
    for label, settings in schedules:
        w = weight.clone().requires_grad_()
        spec = {"method": "fused", "chunk_size": args.chunk_size, **settings}
        _fused_loss(dict(inp, weight=w), spec, "rkl").backward()
        got[label] = w.grad.double()
    print(f"# opd bench losses --grad-error: device={_device_name(args.device)} N={n} V={v} H={h}, rkl, full teacher")
    print("| weight gradient | max abs error / max abs | Frobenius relative error |")
    print("| --- | --- | --- |")
    scale, norm = want.abs().max().item(), want.norm().item()
    for label, g in got.items():
        err = g - want
        print(f"| {label} | {err.abs().max().item() / scale:.2e} | {err.norm().item() / norm:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
