"""The `opd` command: parses the subcommand and imports that component lazily.

Owns only dispatch. Each component's entry point is `main(argv) -> int`, so
`opd teacher ...` and `python -m teacher_server ...` are the same program and
`opd --help` never imports torch or vllm. The demo and the benchmarks live in
the application layer `opd_apps`, above the components; they are named here as
strings and imported by importlib, so `opd` itself imports no layer above it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "teacher": ("teacher_server.__main__", "serve a teacher model's log-probs over gRPC"),
    "rollout": ("rollout_workers.__main__", "sample from the student and push rollouts to Redis"),
    "train": ("student_trainer.__main__", "train the student on rollouts and teacher scores"),
    "demo": ("opd_apps.demo.pipeline", "run the whole pipeline on one machine"),
    "score": ("opd_apps.score.command", "score a file of sequences with a teacher once, into Parquet (offline scores)"),
    "export": ("student_trainer.export", "write a consolidated Hugging Face model from a trainer checkpoint"),
    "eval": ("opd_apps.eval.command", "pass@k of a model or checkpoint on a prompt file, with divergence to a teacher"),
    "convert-prompts": ("opd_apps.tools.prompt_convert", "MATH-500 / AIME / DAPO files to opd's prompt schema"),
    "queue": ("opd_apps.tools.queue", "list dead-lettered prompts and rollouts with reasons; requeue or drop them"),
    "bench": ("opd.cli", "benchmarks; see `opd bench --help`"),
    "certs": (
        "opd.certs",
        "make a CA, the teacher's and the students' TLS certificates (Kubernetes without cert-manager)",
    ),
}

BENCHMARKS: dict[str, tuple[str, str]] = {
    "teacher": ("opd_apps.bench.teacher", "teacher service vs in-process backend; wire bytes vs vLLM's JSON API"),
    "openai": ("opd_apps.bench.openai", "one teacher's gRPC service vs its OpenAI-compatible port: bytes, positions/s"),
    "losses": ("opd_apps.bench.losses", "chunked losses vs full-logits baselines (memory, time)"),
    "queue": ("opd_apps.bench.queue", "rollout records through Redis Streams vs raw XADD/XREADGROUP"),
    "trainer": ("opd_apps.bench.trainer", "teacher wait share of the step at prefetch depth 0, 1, 2"),
    "pipeline": ("opd_apps.bench.pipeline", "the whole pipeline as processes: admission by version vs in-flight count"),
    "tenants": ("opd_apps.bench.tenants", "four students on one pinned teacher: a flood, then saturation shares"),
    "trl": ("opd_apps.bench.trl_compare", "opd's pipeline vs TRL's DistillationTrainer on the demo's job (own venv)"),
    "publish": ("opd_apps.bench.publish", "full weights vs a LoRA adapter: bytes, step end -> worker sampling it"),
    "fuzz": ("opd_apps.bench.fuzz", "property-based fuzzing of the teacher's RPCs, /v1/score and the record decoder"),
}


def _usage(table: dict[str, tuple[str, str]], prog: str) -> str:
    width = max(len(name) for name in table)
    rows = "\n".join(f"  {name.ljust(width)}  {text}" for name, (_, text) in table.items())
    return (
        f"usage: {prog} <command> [options]\n\ncommands:\n{rows}\n\n"
        f"`{prog} <command> --help` lists a command's options."
    )


def _run(module_name: str, argv: Sequence[str], what: str) -> int:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            print(f"opd: `{what}` is not available in this installation ({module_name} is missing)", file=sys.stderr)
            return 2
        print(
            f"opd: `{what}` needs the package {exc.name!r}; install opd with the `cpu` or `gpu` extra (see the README)",
            file=sys.stderr,
        )
        return 2
    return int(module.main(list(argv)) or 0)


def bench_main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(BENCHMARKS, "opd bench"))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"opd bench: unknown benchmark {name!r}\n\n{_usage(BENCHMARKS, 'opd bench')}", file=sys.stderr)
        return 2
    return _run(BENCHMARKS[name][0], rest, f"opd bench {name}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(COMMANDS, "opd"))
        return 0 if argv else 2
    if argv[0] == "--version":
        from opd import __version__

        print(f"opd {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name == "bench":
        return bench_main(rest)
    if name not in COMMANDS:
        print(f"opd: unknown command {name!r}\n\n{_usage(COMMANDS, 'opd')}", file=sys.stderr)
        return 2
    return _run(COMMANDS[name][0], rest, f"opd {name}")
