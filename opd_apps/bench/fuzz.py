"""`opd bench fuzz`: property-based fuzzing of the teacher service and the record decoder, with counts.

Starts a teacher (`hf` backend, the tiny random model, max_model_len 64,
max_top_k 16, full vocabulary allowed, 4 MiB messages) on 127.0.0.1 and runs
`hypothesis` against six targets, each with its own case budget:
`score`, `stream` (ScoreStream), `generate` and `raw` (bytes that are not a
valid message, or one byte over the size limit, sent through a generic channel
method) over real gRPC; `http` (every operation of the ops app's OpenAPI
document, `/v1/score` included, with `schemathesis`); and `records` (the Redis
record decoders, in process). The oracles are test code, in
`tests/fuzz/oracles/` (`teacher_rpcs.py`, `ops_http.py`, `records.py`), which
the wheel does not ship: this command runs from a source checkout (the
repository root on the import path) and says so when they are missing. It is
a fuzzing run with counts, not a timing benchmark; it sits under `opd bench`
because it drives a live server at a budget. After each target the server must still
be serving (gRPC health, Info, a valid Score). Prints per target the cases run,
the count of each status code, the violations and whether the server still
served; exits 1 if any oracle was violated. `--quick` runs 30 cases per target
(the smoke test); a full run is >= 10,000 cases.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fuzz.oracles.teacher_rpcs import Limits

FULL = {"score": 2500, "stream": 800, "generate": 1200, "raw": 1500, "http": 1000, "records": 4000}
QUICK = dict.fromkeys(FULL, 30)
LIMITS = {"max_model_len": 64, "max_top_k": 16, "max_message_mb": 4}


ORACLES_MISSING = (
    "opd bench fuzz: the fuzz oracles (tests/fuzz/oracles/) are test code and are not installed with the wheel; "
    "run it from a source checkout, at the repository root: `cd opd && python -m opd bench fuzz`"
)


def oracles_available() -> bool:
    """Whether `tests.fuzz.oracles` (test code, not in the wheel) imports: a source checkout on the import path."""
    import importlib.util

    try:
        return importlib.util.find_spec("tests.fuzz.oracles") is not None
    except ModuleNotFoundError:  # no `tests` package at all
        return False


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="opd bench fuzz", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--targets", nargs="+", choices=list(FULL), default=list(FULL), help="targets to fuzz (all)")
    p.add_argument("--cases", type=int, help="cases per target (default: a full run's budget per target)")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed: the same seed draws the same cases")
    p.add_argument("--show", type=int, default=3, help="violations printed per target")
    p.add_argument("--quick", action="store_true", help="30 cases per target (the smoke test)")
    args = p.parse_args(argv)
    if args.cases is not None and args.cases < 1:
        p.error(f"--cases must be at least 1 (got {args.cases})")
    budget = QUICK if args.quick else FULL
    args.budget = {t: args.cases or budget[t] for t in args.targets}
    return args


def fuzz(strategy, run: Callable[[Any], list[str]], cases: int, seed: int) -> tuple[int, Counter, list[str]]:
    """Run `cases` hypothesis examples of `strategy` through `run`; count statuses, collect violations."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed

    from tests.fuzz.oracles.teacher_rpcs import FuzzViolation

    counts: Counter[str] = Counter()
    violations: list[str] = []
    ran = 0

    @fixed_seed(seed)
    @settings(
        max_examples=cases,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck.__members__.values()),
    )
    @given(strategy)
    def one(case) -> None:
        nonlocal ran
        ran += 1
        try:
            counts.update(run(case))
        except FuzzViolation as exc:
            counts["VIOLATION"] += 1
            violations.append(str(exc))

    one()
    return ran, counts, violations


def still_serving(address: str, limits) -> bool:
    """gRPC health SERVING, Info answers, and a valid Score gets its positions."""
    import grpc
    import numpy as np
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos import teacher_pb2 as pb
    from protos import teacher_pb2_grpc as pb_grpc
    from protos.arrays import pack

    try:
        with grpc.insecure_channel(address) as channel:
            # typeshed's HealthStub omits the per-method attributes the generated __init__ sets
            health_stub = health_pb2_grpc.HealthStub(channel)
            health = health_stub.Check(health_pb2.HealthCheckRequest(), timeout=30)  # pyright: ignore[reportAttributeAccessIssue]
            stub = pb_grpc.TeacherStub(channel)
            info = stub.Info(pb.InfoRequest(), timeout=30)
            ids = pack(np.arange(8, dtype=np.int32) % limits.vocab_size, pb.INT32)
            reply = stub.Score(pb.ScoreRequest(token_ids=ids, score_from=1, top_k=2), timeout=60)
    except grpc.RpcError:
        return False
    return health.status == health_pb2.HealthCheckResponse.SERVING and info.vocab_size > 0 and reply.num_positions == 7


def fuzz_teacher_config(model_dir: str):
    from teacher_server.config import TeacherConfig

    return TeacherConfig.model_validate(
        {
            "model": model_dir,
            "backend": "hf",
            "engine": {
                "max_model_len": LIMITS["max_model_len"],
                "max_top_k": LIMITS["max_top_k"],
                "allow_full_vocab": True,
            },
            "grpc": {"host": "127.0.0.1", "port": 0, "max_message_mb": LIMITS["max_message_mb"], "drain_grace_s": 2},
            "ops": {"host": "127.0.0.1", "port": 0},
        }
    )


def limits_of(server) -> Limits:
    from tests.fuzz.oracles.teacher_rpcs import Limits

    info = server.server.engine.info
    return Limits(info.vocab_size, info.max_model_len, info.max_top_k, server.server.config.grpc.max_message_mb << 20)


def targets(server, channel, limits: Limits) -> dict[str, tuple[Any, Callable[[Any], list[str]]]]:
    """target name -> (hypothesis strategy, run one case)."""
    from protos import teacher_pb2_grpc as pb_grpc
    from tests.fuzz.oracles import ops_http as fuzz_http
    from tests.fuzz.oracles import records as fuzz_records
    from tests.fuzz.oracles import teacher_rpcs as g

    stub = pb_grpc.TeacherStub(channel)
    schema = fuzz_http.load_schema(server.ops_url)
    return {
        "score": (g.score_cases(limits), lambda c: g.run_score(stub, c, limits)),
        "stream": (g.stream_cases(limits), lambda c: g.run_stream(stub, c, limits)),
        "generate": (g.generate_cases(limits), lambda c: g.run_generate(stub, c, limits)),
        "raw": (g.raw_cases(limits), lambda c: g.run_raw(channel, c, limits)),
        "http": (fuzz_http.http_cases(schema), lambda c: fuzz_http.run_http(c, server.ops_url)),
        "records": (fuzz_records.record_payloads(), fuzz_records.run_decoders),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    try:
        import hypothesis  # noqa: F401
        import schemathesis  # noqa: F401
    except ImportError as exc:
        print(f"opd bench fuzz: needs {exc.name!r}; install opd with the `dev` extra", flush=True)
        return 2
    if not oracles_available():
        print(ORACLES_MISSING, flush=True)
        return 2
    import grpc

    from opd.logs import setup_logging
    from opd.model_source import cache_dir
    from opd_apps.demo.models import tiny_pair
    from teacher_server.server import ServerThread

    setup_logging("ERROR")
    server = ServerThread(fuzz_teacher_config(str(tiny_pair(cache_dir() / "demo")[0]))).start()
    limits = limits_of(server)
    print(f"teacher {server.address} (ops {server.ops_url}): {limits}; seed {args.seed}")
    rows, shown, failed = [], [], False
    print(HEADER, flush=True)
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    try:
        with grpc.insecure_channel(server.address, options=options) as channel:
            table = targets(server, channel, limits)
            for name in args.targets:
                started = time.perf_counter()
                ran, counts, violations = fuzz(table[name][0], table[name][1], args.budget[name], args.seed)
                serving = still_serving(server.address, limits)
                failed |= bool(violations) or not serving
                rows.append((name, ran, counts, len(violations), serving, time.perf_counter() - started))
                print(format_row(*rows[-1]), flush=True)
                shown += [f"[{name}] {v}" for v in violations[: args.show]]
    finally:
        server.stop()
    print(format_total(rows))
    for line in shown:
        print(line)
    return 1 if failed else 0


HEADER = f"{'target':<10}{'cases':>8}{'violations':>12}{'serving after':>15}{'seconds':>9}  statuses"


def format_row(name: str, ran: int, counts: Counter, violations: int, serving: bool, seconds: float) -> str:
    statuses = ", ".join(f"{code} {n}" for code, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{name:<10}{ran:>8d}{violations:>12d}{'yes' if serving else 'NO':>15}{seconds:>9.1f}  {statuses}"


def format_total(rows: list[tuple]) -> str:
    return f"{'total':<10}{sum(r[1] for r in rows):>8d}{sum(r[3] for r in rows):>12d}"


if __name__ == "__main__":
    raise SystemExit(main())
