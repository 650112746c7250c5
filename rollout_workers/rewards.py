"""Reward functions: `fn(response_text, prompt_record) -> float | None`, pluggable by `module:function`.

Built in: `math` (extract the final answer — the last `\\boxed{...}`, else an
`Answer:` line — and compare it with the reference using the `math-verify`
package, which knows that 1/2, 0.5 and \\frac{1}{2} are equal; without the
package, a normalised string / number comparison), `math_equiv` (the OPSD
recipe's `math_reward.py`: the last `\\boxed{}` only, compared with the
reference after the Hendrycks MATH `is_equiv` string normalisation, no
symbolic algebra) and `exact` (normalised exact match of the extracted answer). A prompt with no reference answer gets
reward None. Rewards run in a worker thread with a time limit (worker.py);
math-verify's own signal-based timeout is used only on the main thread,
where signals work.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any, cast

from protos.records import PromptRecord
from rollout_workers.plugins import import_attribute

RewardFn = Callable[[str, PromptRecord], float | None]

_ANSWER_LINE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*(.+)", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


class RewardError(ValueError):
    """The reward spec cannot be loaded; the message says how to name one."""


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces allowed), or None."""
    matches = list(_BOXED.finditer(text))
    for match in reversed(matches):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_final_answer(text: str) -> str | None:
    """The boxed answer, else the text after the last `Answer:` / `final answer is`, else None."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    lines = [m.group(1).strip() for m in _ANSWER_LINE.finditer(text)]
    return lines[-1].rstrip(".").strip() if lines else None


def normalize_answer(text: str) -> str:
    """Lower-case, drop `$`, `\\text{}`, spaces, thousands separators and a trailing period."""
    text = re.sub(r"\\text\{([^}]*)\}", r"\1", text.strip().strip("$"))
    text = re.sub(r"\s+", "", text.lower()).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    return text


def _numbers_equal(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    except ValueError:
        return False


def exact_match_reward(response: str, prompt: PromptRecord) -> float | None:
    """1.0 when the extracted (or whole) answer equals the reference after normalisation, else 0.0."""
    if prompt.answer is None:
        return None
    predicted = extract_final_answer(response)
    predicted = response if predicted is None else predicted
    return float(normalize_answer(predicted) == normalize_answer(prompt.answer))


def _math_verify(gold: str, predicted: str) -> bool | None:
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    # math_verify's timeout is signal-based (main thread only); it documents None as "no timeout" but
    # annotates the parameter as int
    timeout: Any = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout) or parse(gold, parsing_timeout=timeout)
    predicted_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    if not gold_parsed or not predicted_parsed:
        return False
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=timeout))


def math_reward(response: str, prompt: PromptRecord) -> float | None:
    """1.0 when the final answer is mathematically equal to the reference, 0.0 otherwise (None: no reference)."""
    if prompt.answer is None:
        return None
    predicted = extract_final_answer(response)
    if predicted is None:
        return 0.0
    gold = prompt.answer.strip()
    if normalize_answer(predicted) == normalize_answer(gold) or _numbers_equal(
        normalize_answer(predicted), normalize_answer(gold)
    ):
        return 1.0
    verdict = _math_verify(gold, predicted)
    return float(bool(verdict))


class _Unnormalizable(ValueError):
    """Hendrycks' `strip_string` fails on this text (its `is_equiv` then compares the raw strings)."""


def _fix_fracs(text: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}`; a `\\frac` followed by one character leaves
    the text as it was (Hendrycks MATH)."""
    head, *rest = text.split("\\frac")
    out = head
    for part in rest:
        out += "\\frac"
        if not part:
            raise _Unnormalizable(text)
        if part[0] == "{":
            out += part
        elif len(part) < 2:
            return text
        else:
            a, b, tail = part[0], part[1], part[2:]
            out += f"{{{a}}}{b}{tail}" if b == "{" else f"{{{a}}}{{{b}}}{tail}"
    return out


def _fix_a_slash_b(text: str) -> str:
    """`3/4` (two integers written canonically) -> `\\frac{3}{4}`."""
    parts = text.split("/")
    if len(parts) != 2 or not all(re.fullmatch(r"-?\d+", p) and str(int(p)) == p for p in parts):
        return text
    return f"\\frac{{{parts[0]}}}{{{parts[1]}}}"


def hendrycks_normalize(text: str) -> str:
    """The Hendrycks MATH answer normalisation (`strip_string` of its `is_equiv`, as verl and the recipe use it):
    drop line breaks, `\\!`, `\\left`/`\\right`, degrees, dollars, a trailing `\\text{ unit}`, percent signs and
    spaces; `tfrac`/`dfrac` -> `frac`; a leading `.` gets a 0; `x = ...` (short left side) keeps the right
    side; `\\sqrt3` -> `\\sqrt{3}`; `\\frac12` -> `\\frac{1}{2}`; `0.5` -> `\\frac{1}{2}`; `a/b` -> `\\frac{a}{b}`.
    Raises `_Unnormalizable` where Hendrycks' code fails (two `\\text{ ` units, a bare trailing `\\frac`)."""
    text = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in text:
        units = text.split("\\text{ ")
        if len(units) != 2:
            raise _Unnormalizable(text)
        text = units[0]
    text = text.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        text = sides[1]
    text = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text).replace(" ", "")
    text = _fix_fracs(text)
    return "\\frac{1}{2}" if text == "0.5" else _fix_a_slash_b(text)


def math_equiv_reward(response: str, prompt: PromptRecord) -> float | None:
    """The recipe's reward (OPSD `math_reward.py`): 1.0 when the last `\\boxed{}` equals the reference after
    `hendrycks_normalize` of both, else 0.0 (no boxed answer: 0.0; no reference: None)."""
    if prompt.answer is None:
        return None
    predicted = extract_boxed(response)
    if predicted is None:
        return 0.0
    return float(is_equiv(predicted, prompt.answer))


def is_equiv(predicted: str, reference: str) -> bool:
    """Hendrycks MATH `is_equiv`: the normalised strings are equal (raw strings where normalising fails)."""
    try:
        return hendrycks_normalize(predicted) == hendrycks_normalize(reference)
    except _Unnormalizable:
        return predicted == reference


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "math_equiv": math_equiv_reward,
    "exact": exact_match_reward,
}


def load_reward(spec: str | None) -> RewardFn | None:
    """None / `none`, a built-in name (`math`, `exact`) or `module:function`."""
    if spec is None or spec == "none":
        return None
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    fn = import_attribute(
        spec,
        kind="reward",
        builtins=", ".join(BUILTIN_REWARDS),
        flag="--reward-function",
        error=RewardError,
        form="module:function",
    )
    if not callable(fn):
        raise RewardError(f"reward {spec!r} is not callable")
    return cast(RewardFn, fn)  # a plug-in: its signature is checked by calling it, its result by float()
