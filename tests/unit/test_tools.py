"""Tools: the safe calculator, tool-call parsing, plug-ins, and the multi-turn loop on a scripted model."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from rollout_workers.engine import Generation, GenerationBackend, SampleParams
from rollout_workers.episode import EpisodeLimits, run_episode
from rollout_workers.tools import CALCULATOR, Tool, ToolBox, ToolCall, ToolError, load_tool, parse_tool_calls, safe_eval
from tests.fixtures.tiny_models import build_tokenizer

pytestmark = pytest.mark.timeout(60)


def slow_tool(arguments: dict) -> str:
    """Sleeps longer than the test's tool limit."""
    time.sleep(1)
    return "late"


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("2*3", 6),
        ("(1 + 2) ** 3 - 4 / 2", 25.0),
        ("2^10", 1024),
        ("sqrt(16) + abs(-2)", 6.0),
        ("7 // 2 % 3", 0),
        ("-pi < 0", None),
    ],
)
def test_calculator_evaluates_arithmetic(expression: str, value) -> None:
    if value is None:
        with pytest.raises(ToolError):
            safe_eval(expression)
    else:
        assert safe_eval(expression) == value


@pytest.mark.parametrize(
    ("expression", "needle"),
    [
        ("__import__('os').system('true')", "unsupported"),
        ("(1).__class__", "unsupported"),
        ("open('x')", "unsupported"),
        ("9 ** 9 ** 9", "too large"),
        ("10 ** 99 * 10 ** 99", "too large"),
        ("1/0", "ZeroDivisionError"),
        ("2 +", "cannot parse"),
        ("1" * 300, "longer than"),
        ("factorial(10000)", "too large"),
        ("x + 1", "unsupported"),
    ],
)
def test_calculator_refuses_unsafe_or_unbounded_input(expression: str, needle: str) -> None:
    with pytest.raises(ToolError, match=needle):
        safe_eval(expression)


def test_parse_tool_calls_good_and_malformed() -> None:
    text = (
        'thinking <tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call> and '
        '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"2\\"}"}</tool_call>'
        '<tool_call>not json</tool_call><tool_call>{"arguments": {}}</tool_call>'
    )
    calls = parse_tool_calls(text)
    assert calls[0] == ToolCall("calculator", {"expression": "1+1"})
    assert calls[1] == ToolCall("calculator", {"expression": "2"})
    assert "not valid JSON" in calls[2].error and "needs" in calls[3].error
    assert parse_tool_calls("no calls here") == []


def test_toolbox_turns_failures_into_text() -> None:
    box = ToolBox({"calculator": CALCULATOR, "slow": Tool("slow", "", slow_tool)}, timeout_s=0.2)

    async def go():
        return [
            await box.run(c)
            for c in (
                ToolCall("calculator", {"expression": "6*7"}),
                ToolCall("nope", {}),
                ToolCall("calculator", {"expression": "1/0"}),
                ToolCall("slow", {}),
                ToolCall("?", {}, "bad json"),
            )
        ]

    results = asyncio.run(go())
    assert results[0] == ("42", True)
    assert "unknown tool 'nope'" in results[1][0] and not results[1][1]
    assert "ZeroDivisionError" in results[2][0]
    assert "timed out" in results[3][0]
    assert results[4] == ("error: bad json", False)


def test_plugins_load_by_module_attribute() -> None:
    tool = load_tool("tests.unit.test_tools:slow_tool")
    assert tool.name == "slow_tool" and tool.description.startswith("Sleeps")
    assert load_tool("calculator") is CALCULATOR
    with pytest.raises(ToolError, match="cannot be loaded"):
        load_tool("tests.unit.test_tools:missing")
    with pytest.raises(ToolError, match="module:attribute"):
        load_tool("nonsense")
    assert ToolBox.from_specs(["calculator"]).specs()[0]["function"]["name"] == "calculator"


class ScriptedBackend(GenerationBackend):
    """Returns scripted texts turn by turn (log-prob -0.5 per token, EOS appended)."""

    name = "scripted"

    def __init__(self, tokenizer, turns: list[str], max_model_len: int = 512) -> None:
        self.tokenizer, self.turns, self.max_model_len = tokenizer, list(turns), max_model_len
        self.contexts: list[list[int]] = []

    async def generate(self, prompt_ids, params: SampleParams, request_id: str) -> Generation:
        self.contexts.append(list(prompt_ids))
        ids = self.tokenizer.encode(self.turns.pop(0), add_special_tokens=False)[: params.max_tokens]
        finish = "length" if len(ids) == params.max_tokens else "stop"
        if finish == "stop":
            ids.append(self.tokenizer.eos_token_id)
        return Generation(ids, [-0.5] * len(ids), finish, self.policy_version)

    async def load_policy(self, weights_dir: Path, version: int) -> None:
        self.policy_version = version


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _spans(mask: list[int]) -> list[tuple[int, int, int]]:
    spans, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            spans.append((mask[start], start, i))
            start = i
    return spans


def test_tool_loop_masks_exactly_the_generated_spans(tokenizer) -> None:
    turns = ['<tool_call>{"name": "calculator", "arguments": {"expression": "12+30"}}</tool_call>', "The answer is 42."]
    backend = ScriptedBackend(tokenizer, turns)
    prompt = tokenizer.encode("What is 12 + 30?")
    episode = asyncio.run(
        run_episode(
            backend,
            prompt,
            SampleParams(max_tokens=64),
            request_id="r",
            toolbox=ToolBox({"calculator": CALCULATOR}),
            limits=EpisodeLimits(max_turns=4),
        )
    )
    (m1, a, b), (m0, c, d), (m2, e, f) = _spans(episode.response_mask)
    assert (m1, m0, m2) == (1, 0, 1) and f == len(episode.response_ids)
    first = tokenizer.encode(turns[0], add_special_tokens=False) + [tokenizer.eos_token_id]
    assert episode.response_ids[a:b] == first
    assert (
        tokenizer.decode(episode.response_ids[c:d])
        == "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert episode.logprobs[a:b] == [-0.5] * (b - a) and episode.logprobs[c:d] == [0.0] * (d - c)
    assert backend.contexts[1] == prompt + episode.response_ids[:d]  # turn 2 sees the tool answer
    meta = episode.meta()
    assert meta["turns"] == 2 and meta["tool_calls"] == 1 and meta["tool_errors"] == 0
    assert meta["tool_tokens"] == d - c and meta["generated_tokens"] == (b - a) + (f - e)
    assert meta["tool_token_ratio"] == round((d - c) / ((b - a) + (f - e)), 4)


def test_tool_loop_truncates_answers_and_stops_at_max_turns(tokenizer) -> None:
    long_tool = Tool("echo", "", lambda args: "x " * 500)
    call = '<tool_call>{"name": "echo", "arguments": {}}</tool_call>'
    backend = ScriptedBackend(tokenizer, [call, call, call])
    limits = EpisodeLimits(max_turns=2, max_tool_response_tokens=10)
    episode = asyncio.run(
        run_episode(
            backend,
            [1, 2],
            SampleParams(max_tokens=64),
            request_id="r",
            toolbox=ToolBox({"echo": long_tool}),
            limits=limits,
        )
    )
    assert episode.turns == 2 and episode.finish_reason == "max_turns" and episode.tool_calls == 1
    pairs = zip(episode.response_ids, episode.response_mask, strict=True)
    tool_text = tokenizer.decode([t for t, m in pairs if m == 0])
    assert "[truncated]" in tool_text and tool_text.count("x") <= 10


def test_single_turn_without_toolbox_and_response_budget(tokenizer) -> None:
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "1"}}</tool_call>'
    episode = asyncio.run(
        run_episode(ScriptedBackend(tokenizer, [call]), [1], SampleParams(max_tokens=64), request_id="r")
    )
    assert episode.turns == 1 and set(episode.response_mask) == {1} and episode.tool_calls == 0
    budget = EpisodeLimits(max_turns=3, max_response_tokens=5)
    short = asyncio.run(
        run_episode(
            ScriptedBackend(tokenizer, ["a long answer that goes on"]),
            [1],
            SampleParams(max_tokens=64),
            request_id="r",
            limits=budget,
        )
    )
    assert len(short.response_ids) == 5 and short.finish_reason == "length"
