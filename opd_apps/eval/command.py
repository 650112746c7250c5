"""`opd eval`: pass@k of a student (or a trainer checkpoint) on a prompt file, and its divergence to a teacher.

    opd eval --model DIR|embedded|CHECKPOINT [--base-model DIR] --prompts FILE [--teacher HOST:PORT] --out DIR

Steps: check every input before an engine starts (prompt file, reward,
model or checkpoint, the teacher's `Info` and tokenizer); sample n responses
per prompt with fixed per-sample seeds through the rollout workers' engine
(vLLM, or transformers with `--backend hf`); reward them (`math` with
math-verify, `exact`, or a `module:function` plug-in); with a teacher, score
every response and compare it with the student's own teacher-forced
log-probs; write `eval.json`, `eval.md` and `samples.jsonl` to `--out`.

The statistics (pass@k, intervals, divergences, teacher diagnostics) are the
evaluation core's, `student_trainer.evaluation`, shared with the trainer's
eval rounds and the demo's report.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from opd.config import ConfigError, load_config
from opd.logs import setup_logging
from opd.model_source import load_tokenizer
from opd.prompts import PromptSourceError, load_prompts, render_prompt_ids
from opd_apps.eval.config import EvalCommandConfig, normalize_argv
from opd_apps.eval.model import EvalError, ResolvedModel, resolve_student
from opd_apps.eval.run import EvalSample, TeacherScoring, sample_all
from opd_apps.eval.student import StudentScorer
from protos.records import PromptRecord
from protos.tokenizer_fingerprint import tokenizer_fingerprint
from rollout_workers.engine import BackendError
from rollout_workers.rewards import BUILTIN_REWARDS, RewardError, load_reward

log = logging.getLogger(__name__)

DESCRIPTION = (
    "pass@k of a student model (an HF directory, `embedded`, or a trainer checkpoint with --base-model) on a "
    "prompt file with reference answers: n samples per prompt with fixed seeds through the rollout engine, "
    "rewarded by `math` (math-verify), `exact` or a module:function plug-in; with --teacher HOST:PORT also the "
    "per-token divergence to the teacher and teacher-token diagnostics. Writes eval.json, eval.md and "
    "samples.jsonl to --out. Options come from --config YAML < OPD_EVAL__* env < flags."
)

TEACHER_NOTE = (
    "reverse_kl_sampled is an unbiased estimate of KL(p_S||p_T) only when sampling at temperature 1 with top-p 1 "
    "and top-k off (else it is the mean of log p_S - log p_T over the tokens actually sampled); the student's "
    "log-probs are its teacher-forced temperature-1 distribution. teacher_entropy_topk_tail counts the top-k and "
    "one tail bucket: a lower bound of the teacher's full entropy."
)


def _check_prompts(config: EvalCommandConfig, records: list[PromptRecord]) -> None:
    seen: set[str] = set()
    for record in records:
        if record.prompt_id in seen:
            raise EvalError(f"prompt id {record.prompt_id!r} appears twice in {config.prompts!r}; ids must be unique")
        seen.add(record.prompt_id)
    missing = sum(r.answer is None for r in records)
    if config.reward.function in BUILTIN_REWARDS and missing == len(records):
        raise EvalError(
            f"no row of {config.prompts!r} has a reference answer in field {config.dataset.answer_field!r}; set "
            f"--dataset-answer-field, or convert a published set with `opd convert-prompts`"
        )
    if missing:
        log.warning("%d of %d prompts have no reference answer: their samples get no reward", missing, len(records))


def _prompt_ids(config: EvalCommandConfig, tokenizer, records: list[PromptRecord]) -> dict[str, list[int]]:
    out = {}
    for record in records:
        ids = render_prompt_ids(tokenizer, record, enable_thinking=config.enable_thinking)
        if len(ids) >= config.engine.max_model_len:
            raise EvalError(
                f"prompt {record.prompt_id!r} is {len(ids)} tokens, engine.max_model_len is "
                f"{config.engine.max_model_len}; raise --engine-max-model-len"
            )
        out[record.prompt_id] = ids
    return out


def _rollout_config(config: EvalCommandConfig, model: ResolvedModel):
    from rollout_workers.config import RolloutConfig, SamplingConfig

    s = config.sampling
    return RolloutConfig(
        model=str(model.path),
        tokenizer=config.tokenizer,
        backend=config.backend,
        engine=config.engine,
        sampling=SamplingConfig(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens),
    )


async def _sample(config: EvalCommandConfig, model: ResolvedModel, records, prompt_ids, reward_fn, keep_hf: bool):
    """Samples, and the HF model when the backend is transformers and the caller will score with it."""
    from rollout_workers.engine import create_backend

    backend = await create_backend(_rollout_config(config, model))
    try:
        samples = await sample_all(backend, records, prompt_ids, reward_fn, config)
    finally:
        hf_model = getattr(backend, "model", None) if keep_hf and backend.name == "hf" else None
        await backend.close()  # free the engine before the student is loaded again for scoring
    return samples, hf_model


async def _score(
    config: EvalCommandConfig, teacher: TeacherScoring, model: ResolvedModel, samples: list[EvalSample], hf_model
) -> dict:
    try:
        scorer = (
            StudentScorer(hf_model)
            if hf_model is not None
            else await asyncio.to_thread(StudentScorer.load, model.path, config.engine.device, config.engine.dtype)
        )
        means = await teacher.score(samples, scorer)
    except EvalError:
        raise
    except ValueError as exc:  # the scorer's refusals: logits it cannot reproduce, a vocabulary mismatch
        raise EvalError(str(exc)) from None
    info = teacher.info
    return {
        "addresses": config.teacher.addresses,
        "model_name": info.model_name,
        "backend": info.backend,
        "top_k": teacher.top_k,
        "tokens": means.tokens,
        "means": means.means(),
        "note": TEACHER_NOTE,
    }


async def evaluate(config: EvalCommandConfig) -> Path:
    """Run one evaluation; returns the report directory."""
    from opd_apps.eval.report import build_report, write_report

    started = time.monotonic()
    out = Path(config.out or time.strftime("runs/eval-%Y%m%d-%H%M%S"))
    # 1. Inputs, all checked before an engine starts.
    records = load_prompts(config.prompts, config.dataset.source_config())
    _check_prompts(config, records)
    reward_fn = load_reward(config.reward.function)
    model = resolve_student(config.model, config.base_model, out)
    tokenizer = load_tokenizer(Path(config.tokenizer) if config.tokenizer else model.path)
    prompt_ids = _prompt_ids(config, tokenizer, records)
    teacher = TeacherScoring(config) if config.teacher.addresses else None
    try:
        if teacher is not None:
            longest = max(len(ids) for ids in prompt_ids.values()) + config.sampling.max_tokens
            await teacher.check(tokenizer_fingerprint(tokenizer), len(tokenizer), longest)
        # 2. Sample and reward.
        prepared = time.monotonic()
        samples, hf_model = await _sample(config, model, records, prompt_ids, reward_fn, teacher is not None)
        sampled = time.monotonic()
        # 3. Teacher scores and the student's own log-probs.
        teacher_facts = None if teacher is None else await _score(config, teacher, model, samples, hf_model)
    finally:
        if teacher is not None:
            await teacher.close()
    wall = {"prepare": prepared - started, "sample": sampled - prepared, "teacher": time.monotonic() - sampled}
    # 4. Report.
    report = build_report(
        config,
        model.describe(),
        records,
        samples,
        teacher=teacher_facts,
        wall_s={k: round(v, 3) for k, v in wall.items()},
    )
    write_report(out, report, samples, config.reward.pass_threshold)
    _print_summary(report, out)
    return out


def _print_summary(report: dict, out: Path) -> None:
    passes = ", ".join(
        f"pass@{k} {v['value']:.4f}" if v["value"] is not None else f"pass@{k} n/a"
        for k, v in report["pass_at_k"].items()
    )
    print(f"{report['prompts']['count']} prompts x {report['sampling']['n']} samples: {passes}")
    if report["teacher"] is not None:
        metrics = report["teacher"]["metrics"]
        print("teacher: " + ", ".join(f"{k} {m['value']:.4f}" for k, m in metrics.items() if m["value"] is not None))
    print(f"report: {out / 'eval.md'} and {out / 'eval.json'}")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(
            EvalCommandConfig,
            normalize_argv(sys.argv[1:] if argv is None else argv),
            prog="opd eval",
            description=DESCRIPTION,
            env_prefix="OPD_EVAL__",
        )
        setup_logging(config.log_level)
        asyncio.run(evaluate(config))
    except (ConfigError, PromptSourceError, RewardError, BackendError, EvalError) as exc:
        print(f"opd eval: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
