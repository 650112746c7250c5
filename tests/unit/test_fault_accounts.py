"""The fault tests' accounts (`tests.fixtures.run_audit`) on hand-written steps.jsonl lines: pure logic."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.fixtures.run_audit import Accounts, effective_steps, sample_key


def _line(step: int, *rollouts: str, **extra) -> dict:
    return {"step": step, "time": float(step), "rollouts": list(rollouts), **extra}


def _write(tmp_path, lines: list[dict], prompts: int = 4, lost: list[dict] = ()) -> tuple:
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "steps.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (ckpt / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lost))
    prompt_file = tmp_path / "p.jsonl"
    prompt_file.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "hi"}) + "\n" for i in range(prompts)))
    return ckpt, prompt_file


def test_sample_key_is_prompt_id_and_sample_index_whatever_the_entry():
    assert sample_key("q1@1700000000000-0/1") == ("q1", 1)
    assert sample_key("a@b@1-2/0") == ("a@b", 0)  # the last @ separates the entry id
    with pytest.raises(ValueError, match="PROMPT_ID@ENTRY_ID/SAMPLE"):
        sample_key("q1/1")


def test_a_resumed_run_replaces_the_steps_the_dead_run_never_committed():
    lines = [_line(1), _line(2), _line(3), _line(4), _line(5), _line(3), _line(4)]  # killed after 5, resumed at 2
    assert [line["step"] for line in effective_steps(lines)] == [1, 2, 3, 4]
    assert [line["time"] for line in effective_steps(lines)][2:] == [3.0, 4.0]
    assert effective_steps(lines)[2] is lines[5]  # the resumed run's step 3, not the dead one's


def test_a_key_trained_twice_under_two_rollout_ids_is_caught(tmp_path):
    ckpt, prompts = _write(tmp_path, [_line(1, "q0@1-0/0", "q0@1-0/1"), _line(2, "q0@9-0/0", "q1@2-0/0")])
    accounts = Accounts.read(ckpt, prompts, 2, Counter(), (set(), {}))
    problems = accounts.problems(max_steps=2)
    assert any("more than once: [('q0', 0)]" in p for p in problems), problems


def test_the_dead_runs_uncommitted_steps_do_not_count_twice(tmp_path):
    lines = [_line(1, "q0@1-0/0"), _line(2, "q1@2-0/0"), _line(2, "q1@2-0/0"), _line(3, "q2@3-0/0")]
    ckpt, prompts = _write(tmp_path, lines)
    fed = Counter({("q0", 0): 1, ("q1", 0): 1, ("q2", 0): 1})
    assert Accounts.read(ckpt, prompts, 1, fed, (set(), {})).problems(max_steps=3) == []


def test_every_fed_key_is_trained_lost_or_in_flight(tmp_path):
    lost = [
        {"event": "refed", "prompt_id": "q2", "reason": "stale"},  # a refeed is not a loss
        {"event": "lost", "prompt_id": "q3", "reason": "dead_letter"},
    ]
    ckpt, prompts = _write(tmp_path, [_line(1, "q0@1-0/0")], lost=lost)
    fed = Counter({("q0", 0): 1, ("q1", 0): 1, ("q2", 0): 2, ("q3", 0): 1})
    in_flight = {("q1", 0)}
    accounts = Accounts.read(ckpt, prompts, 1, fed, (in_flight, {}))
    assert accounts.lost == {("q3", 0): "dead_letter"}
    problems = accounts.problems(max_steps=1)
    assert problems == ["1 fed keys neither trained, in flight nor recorded lost: [('q2', 0)]"]
    accounts.in_flight.add(("q2", 0))
    assert accounts.problems(max_steps=1) == []


def test_missing_steps_dead_letters_and_unlisted_stale_drops_are_problems(tmp_path):
    lines = [_line(1, "q0@1-0/0", dropped_stale=2), _line(3, "q1@1-0/0")]
    ckpt, prompts = _write(tmp_path, lines)
    dead = {("q2", 0): "dead-lettered: max deliveries"}
    problems = Accounts.read(ckpt, prompts, 1, Counter(), (set(), dead)).problems(max_steps=3)
    assert problems[0] == "trained steps [1, 3], expected 1..3 each once"
    assert any("dead-lettered, never fed again" in p for p in problems)
    assert any("dropped as stale, and steps.jsonl does not say which" in p for p in problems)
    # since the trainer writes `sample_keys`, `rollouts` are the trained ones: the stale count needs no list
    lines[0]["sample_keys"] = [["q0", 0]]
    (tmp_path / "b").mkdir()
    ckpt_b, _ = _write(tmp_path / "b", lines)
    problems = Accounts.read(ckpt_b, prompts, 1, Counter(), (set(), {})).problems(max_steps=3)
    assert not any("stale" in p for p in problems)
