"""`opd eval` end to end on tiny models: the report, pass@k from the per-sample rewards, seeds, a real teacher."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from opd_apps.eval.command import main
from protos.records import PromptRecord

pytestmark = pytest.mark.timeout(240)
PROMPTS = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "eval_prompts.jsonl"
FAST = ["--backend", "hf", "--sampling-max-tokens", "8", "--engine-max-model-len", "256", "--no-progress"]


def flaky_reward(response: str, prompt: PromptRecord) -> float:
    """A plug-in reward with all three outcomes: raises on some responses, else 1 or 0 by length."""
    if len(response) % 5 == 0:
        raise ValueError("this reward fails on purpose")
    return float(len(response) % 2 == 0)


def failing_reward(response: str, prompt: PromptRecord) -> float:
    raise RuntimeError("always fails")


def _run(model: Path | str, out: Path, *extra: str) -> dict:
    assert main(["--model", str(model), "--prompts", str(PROMPTS), "--out", str(out), *FAST, *extra]) == 0
    return json.loads((out / "eval.json").read_text())


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def _enumerated_pass_at_k(n: int, c: int, k: int) -> Fraction:
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def _check_pass_at_k_from_samples(report: dict, samples: list[dict]) -> None:
    by_prompt: dict[str, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_id"], []).append(s)
    counts = [
        (sum(s["reward"] is not None for s in g), sum(s["reward"] is not None and s["reward"] > 0 for s in g))
        for g in by_prompt.values()
    ]
    for k, entry in report["pass_at_k"].items():
        values = [_enumerated_pass_at_k(n, c, int(k)) for n, c in counts if n >= int(k)]
        assert entry["prompts"] == len(values)
        if values:
            assert entry["value"] == pytest.approx(float(sum(values) / len(values)), abs=1e-12)
        else:
            assert entry["value"] is None
    scored = [s for s in samples if s["reward"] is not None]
    assert report["sample_accuracy"]["scored"] == len(scored)
    assert report["sample_accuracy"]["correct"] == sum(s["correct"] for s in samples)
    assert report["reward"]["failed"] == sum(s["reward_error"] is not None for s in samples)


def test_eval_report_and_pass_at_k_agree_with_the_per_sample_rewards(tiny_model_dir: Path, tmp_path: Path) -> None:
    report = _run(tiny_model_dir, tmp_path / "a", "--sampling-n", "4", "--reward-function", f"{__name__}:flaky_reward")
    samples = _samples(tmp_path / "a")
    assert len(samples) == 3 * 4 and report["prompts"]["count"] == 3
    assert set(report) >= {
        "schema",
        "model",
        "prompts",
        "sampling",
        "reward",
        "pass_at_k",
        "sample_accuracy",
        "diversity",
        "responses",
        "teacher",
        "per_prompt",
        "wall_s",
    }
    assert list(report["pass_at_k"]) == ["1", "2", "4"] and report["teacher"] is None
    assert report["sampling"] == {"n": 4, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_tokens": 8, "seed": 0}
    assert report["model"]["source"] == "hf" and report["model"]["backend"] == "hf"
    assert all(0 < s["response_tokens"] <= 8 for s in samples)
    for s in samples:  # a failed reward is recorded as missing, never as 0
        assert (s["reward"] is None) == (s["reward_error"] is not None) == (len(s["text"]) % 5 == 0)
    _check_pass_at_k_from_samples(report, samples)
    acc = report["sample_accuracy"]
    if acc["scored"]:
        assert acc["wilson95"][0] <= acc["value"] <= acc["wilson95"][1]
    md = (tmp_path / "a" / "eval.md").read_text()
    assert "| 1 |" in md and "add-1" in md

    # fixed seeds: the same command draws the same samples
    _run(tiny_model_dir, tmp_path / "b", "--sampling-n", "4", "--reward-function", f"{__name__}:flaky_reward")
    assert [s["text"] for s in _samples(tmp_path / "b")] == [s["text"] for s in samples]
    # another base seed draws others
    _run(tiny_model_dir, tmp_path / "c", "--sampling-n", "4", "--sampling-seed", "1")
    assert [s["text"] for s in _samples(tmp_path / "c")] != [s["text"] for s in samples]


def test_eval_with_every_reward_failing_reports_no_pass_at_k(tiny_model_dir: Path, tmp_path: Path) -> None:
    report = _run(tiny_model_dir, tmp_path, "--sampling-n", "2", "--reward-function", f"{__name__}:failing_reward")
    assert report["reward"]["failed"] == 6 and report["reward"]["scored"] == 0
    assert all(v["value"] is None and v["prompts"] == 0 for v in report["pass_at_k"].values())
    assert report["sample_accuracy"]["wilson95"] is None


def test_divergence_of_the_teacher_against_itself_is_zero(hf_teacher, tiny_model_dir: Path, tmp_path: Path) -> None:
    report = _run(
        tiny_model_dir, tmp_path, "--sampling-n", "2", "--teacher", hf_teacher.address, "--teacher-top-k", "8"
    )
    teacher = report["teacher"]
    assert teacher["top_k"] == 8 and teacher["tokens"] == sum(s["response_tokens"] for s in _samples(tmp_path))
    m = {name: v["value"] for name, v in teacher["metrics"].items()}
    # same weights, both float32 forwards of the same model: per-token log-probs agree to ~1e-5 (rounding of
    # logits of magnitude ~30 summed in a different order), so the means do to well below 1e-3
    assert abs(m["reverse_kl_sampled"]) < 1e-3 and abs(m["forward_kl_topk_tail"]) < 1e-3
    assert m["top1_agreement"] == 1.0
    assert 0 < m["teacher_entropy_topk_tail"] <= math.log(8 + 1) + 1e-9
    assert 0 < m["teacher_p_sampled"] <= 1 and 0 <= m["sampled_in_teacher_topk"] <= 1
    assert all(s["teacher"] is not None for s in _samples(tmp_path))


def test_divergence_to_another_model_is_positive_and_finite(hf_teacher, tiny_llama_dir: Path, tmp_path: Path) -> None:
    report = _run(tiny_llama_dir, tmp_path, "--sampling-n", "2", "--teacher", hf_teacher.address)
    m = {name: v["value"] for name, v in report["teacher"]["metrics"].items()}
    assert all(v is not None and np.isfinite(v) for v in m.values()), m
    assert report["teacher"]["top_k"] == 20  # the default, under the test teacher's max_top_k of 64
    assert m["forward_kl_topk_tail"] > 0.01  # two random models: a KL that is far from 0
    assert 0 <= m["top1_agreement"] <= 1 and 0 <= m["sampled_in_teacher_topk"] <= 1
    assert 0 < m["teacher_entropy_topk_tail"] <= math.log(21) + 1e-9


def test_a_teacher_with_another_tokenizer_is_refused(hf_teacher, tmp_path: Path, capsys) -> None:
    from tests.fixtures.tiny_models import build_tiny_model, build_tokenizer

    other = build_tiny_model(tmp_path / "other", tokenizer=build_tokenizer(vocab_size=320))
    code = main(
        [
            "--model",
            str(other),
            "--prompts",
            str(PROMPTS),
            "--out",
            str(tmp_path / "o"),
            *FAST,
            "--teacher",
            hf_teacher.address,
        ]
    )
    assert code == 2 and "another tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "o" / "eval.json").exists()


def test_responses_longer_than_the_teacher_accepts_are_refused_before_sampling(
    hf_teacher, tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    argv = ["--model", str(tiny_model_dir), "--prompts", str(PROMPTS), "--out", str(tmp_path), "--backend", "hf"]
    too_long = ["--sampling-max-tokens", "600", "--engine-max-model-len", "1024", "--teacher", hf_teacher.address]
    assert main([*argv, *too_long, "--no-progress"]) == 2
    assert "teacher's max_model_len 512" in capsys.readouterr().err  # the tiny model's 512 positions


def test_bad_inputs_are_clear_errors(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    def error(*argv: str) -> str:
        assert main(["--out", str(tmp_path / "x"), *FAST, *argv]) == 2
        return capsys.readouterr().err

    assert "does not exist" in error("--model", str(tmp_path / "nope"), "--prompts", str(PROMPTS))
    assert "prompt file" in error("--model", str(tiny_model_dir), "--prompts", str(tmp_path / "nope.jsonl"))
    ckpt = tmp_path / "ck" / "step-00000003"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.pt").write_bytes(b"")
    assert "--base-model" in error("--model", str(tmp_path / "ck"), "--prompts", str(PROMPTS))
    no_answers = tmp_path / "q.jsonl"
    no_answers.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    assert "reference answer" in error("--model", str(tiny_model_dir), "--prompts", str(no_answers))
    assert "cannot be loaded" in error(
        "--model", str(tiny_model_dir), "--prompts", str(PROMPTS), "--reward-function", "no_such_module:fn"
    )


@pytest.mark.slow
def test_eval_on_a_trainer_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tests.integration.test_export import SAVE

    subprocess.run([sys.executable, "-c", SAVE, str(tiny_model_dir), str(tmp_path / "ck")], check=True, timeout=120)
    report = _run(tmp_path / "ck", tmp_path / "out", "--base-model", str(tiny_model_dir), "--sampling-n", "1")
    assert report["model"]["source"] == "checkpoint" and report["model"]["step"] == 7
    exported = load_file(Path(report["model"]["path"]) / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    name = "model.embed_tokens.weight"
    np.testing.assert_allclose(exported[name].numpy(), base[name].numpy() + 0.25, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(400)  # engine start is ~15 s on an idle 2-core machine, minutes on a loaded one
def test_eval_on_the_vllm_backend(tiny_model_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "opd",
            "eval",
            "--model",
            str(tiny_model_dir),
            "--prompts",
            str(PROMPTS),
            "--out",
            str(tmp_path),
            "--backend",
            "vllm",
            "--engine-dtype",
            "float32",
            "--engine-vllm-enforce-eager",
            "--sampling-n",
            "4",
            "--sampling-max-tokens",
            "8",
            "--engine-max-model-len",
            "256",
            "--no-progress",
            "--reward-function",
            f"{__name__}:flaky_reward",
        ],
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    samples = _samples(tmp_path)
    assert report["model"]["backend"] == "vllm" and len(samples) == 12
    assert all(0 < s["response_tokens"] <= 8 for s in samples)
    _check_pass_at_k_from_samples(report, samples)
