"""The recipe's `math_equiv` reward (Hendrycks MATH `is_equiv` on the last \\boxed{}) beside `math`.

The table is of answers where the two verifiers agree and where they disagree; each `math_equiv` verdict is the
Hendrycks normalisation worked by hand (its steps named in the comment), so a change of either verifier that
moves a row fails here.
"""

from __future__ import annotations

import pytest

from protos.records import PromptRecord
from rollout_workers.rewards import hendrycks_normalize, is_equiv, load_reward, math_equiv_reward, math_reward

pytestmark = pytest.mark.timeout(60)

# (boxed answer, reference, math_equiv, math)
TABLE = [
    # both accept
    ("0.5", "\\frac{1}{2}", 1.0, 1.0),  # 0.5 -> \frac{1}{2}
    ("1/2", "0.5", 1.0, 1.0),  # a/b -> \frac{a}{b}; 0.5 -> \frac{1}{2}
    ("\\dfrac12", "\\frac{1}{2}", 1.0, 1.0),  # dfrac -> frac; \frac12 -> \frac{1}{2}
    ("x = 3", "3", 1.0, 1.0),  # short left side dropped
    ("5 \\text{ cm}", "5", 1.0, 1.0),  # trailing "\text{ unit}" dropped
    ("90^\\circ", "90", 1.0, 1.0),  # degrees dropped
    ("10\\%", "10", 1.0, 1.0),  # percent dropped
    ("\\sqrt2", "\\sqrt{2}", 1.0, 1.0),  # \sqrt2 -> \sqrt{2}
    # only math-verify accepts: Hendrycks compares strings, no algebra, no number parsing
    ("\\frac{2}{4}", "\\frac{1}{2}", 0.0, 1.0),
    ("3.0", "3", 0.0, 1.0),
    ("1,000", "1000", 0.0, 1.0),
    ("2\\pi", "\\pi \\cdot 2", 0.0, 1.0),
    ("2, 1", "1, 2", 0.0, 1.0),  # a set in another order
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", 0.0, 1.0),
    ("x^2+2x+1", "(x+1)^2", 0.0, 1.0),
    ("\\tfrac{3}{4}", "0.75", 0.0, 1.0),
    ("5\\%", "0.05", 0.0, 1.0),
    ("\\text{Monday}", "Monday", 0.0, 1.0),
    # neither
    ("\\infty", "oo", 0.0, 0.0),
]


def _prompt(answer: str | None) -> PromptRecord:
    return PromptRecord(prompt_id="p", messages=[{"role": "user", "content": "q"}], answer=answer)


@pytest.mark.parametrize(("predicted", "reference", "equiv", "verify"), TABLE)
def test_the_two_verifiers_on_the_table(predicted, reference, equiv, verify):
    response = f"... so the answer is \\boxed{{{predicted}}}."
    assert math_equiv_reward(response, _prompt(reference)) == equiv
    assert math_reward(response, _prompt(reference)) == verify


def test_only_the_last_boxed_answer_counts_and_an_answer_line_is_not_read():
    assert math_equiv_reward("\\boxed{4} no, \\boxed{5}", _prompt("5")) == 1.0
    assert math_equiv_reward("\\boxed{5} no, \\boxed{4}", _prompt("5")) == 0.0
    assert math_equiv_reward("Answer: 5", _prompt("5")) == 0.0  # the recipe reads \boxed{} only
    assert math_reward("Answer: 5", _prompt("5")) == 1.0
    assert math_equiv_reward("\\boxed{5}", _prompt(None)) is None


def test_where_hendrycks_fails_the_raw_strings_are_compared():
    assert is_equiv("1 \\text{ m} 2 \\text{ s}", "1 \\text{ m} 2 \\text{ s}")  # two units: strip_string fails
    assert not is_equiv("1 \\text{ m} 2 \\text{ s}", "1")
    assert hendrycks_normalize("\\frac1") == "\\frac1"  # one character after \frac: left as it was


def test_math_equiv_is_a_builtin_reward_name():
    assert load_reward("math_equiv") is math_equiv_reward
