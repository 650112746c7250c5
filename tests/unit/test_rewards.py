"""Rewards: answer extraction, math equivalence through math-verify, exact match, plug-ins."""

from __future__ import annotations

import importlib.util

import pytest

from protos.records import PromptRecord
from rollout_workers.rewards import (
    RewardError,
    exact_match_reward,
    extract_boxed,
    extract_final_answer,
    load_reward,
    math_reward,
)

pytestmark = pytest.mark.timeout(120)
needs_math_verify = pytest.mark.skipif(
    importlib.util.find_spec("math_verify") is None, reason="symbolic equivalence needs the math-verify package"
)


def _prompt(answer: str | None) -> PromptRecord:
    return PromptRecord("p", messages=[{"role": "user", "content": "q"}], answer=answer)


def constant_reward(response: str, prompt: PromptRecord) -> float:
    return 0.25


def test_extract_boxed_takes_the_last_and_handles_nesting() -> None:
    assert extract_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_boxed(r"\fbox{7}") == "7"
    assert extract_boxed(r"\boxed{unclosed") is None
    assert extract_boxed("nothing") is None


def test_extract_final_answer_falls_back_to_answer_lines() -> None:
    assert extract_final_answer("work...\nAnswer: 42.") == "42"
    assert extract_final_answer("so the final answer is 3/4") == "3/4"
    assert extract_final_answer(r"Answer: 1 but \boxed{2}") == "2"
    assert extract_final_answer("no idea") is None


@pytest.mark.parametrize(
    ("response", "answer", "reward"),
    [
        (r"... so \boxed{42}", "42", 1.0),
        pytest.param(r"\boxed{0.5}", r"\frac{1}{2}", 1.0, marks=needs_math_verify),
        pytest.param(r"\boxed{\frac{2}{4}}", "1/2", 1.0, marks=needs_math_verify),
        pytest.param(r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0, marks=needs_math_verify),
        ("Answer: 1,000", "1000", 1.0),
        (r"\boxed{41}", "42", 0.0),
        ("I do not know", "42", 0.0),
    ],
)
def test_math_reward_compares_mathematically(response: str, answer: str, reward: float) -> None:
    assert math_reward(response, _prompt(answer)) == reward


def test_no_reference_answer_gives_no_reward() -> None:
    assert math_reward(r"\boxed{1}", _prompt(None)) is None
    assert exact_match_reward("x", _prompt(None)) is None


def test_exact_match_normalises_case_space_and_dollars() -> None:
    assert exact_match_reward(r"The result: \boxed{ Paris }", _prompt("paris")) == 1.0
    assert exact_match_reward("  Hello  World. ", _prompt("hello world")) == 1.0
    assert exact_match_reward(r"$\text{blue}$", _prompt("blue")) == 1.0
    assert exact_match_reward(r"\boxed{0.5}", _prompt(r"\frac{1}{2}")) == 0.0


def test_load_reward_builtins_and_plugins() -> None:
    assert load_reward(None) is None and load_reward("none") is None
    assert load_reward("math") is math_reward and load_reward("exact") is exact_match_reward
    assert load_reward("tests.unit.test_rewards:constant_reward")("x", _prompt("y")) == 0.25
    with pytest.raises(RewardError, match="cannot be loaded"):
        load_reward("tests.unit.test_rewards:nothing")
    with pytest.raises(RewardError, match="module:function"):
        load_reward("f1")
