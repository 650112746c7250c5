"""One rollout episode: model turns, with tool answers spliced in between, as one response.

Owns the multi-turn loop: generate a turn (mask 1, behaviour log-probs),
parse `<tool_call>` blocks from it, run them, append the answers as tokens
(mask 0, log-prob 0: the loss never trains on them), and go on until the
model stops calling tools, `max_turns` or the token budgets run out. The
tool answer is wrapped in the chat format's tool turn (ChatML by default:
`<|im_start|>user <tool_response>...</tool_response><|im_end|>` then the next
assistant header) and truncated to `max_tool_response_tokens`.
Not here: prompts, rewards, Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from rollout_workers.engine import GenerationBackend, SampleParams
from rollout_workers.tools import ToolBox, parse_tool_calls

TRUNCATED = " [truncated]"


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 1
    max_response_tokens: int = 4096
    max_tool_response_tokens: int = 256
    turn_prefix: str = "\n<|im_start|>user\n"
    turn_suffix: str = "<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class Episode:
    """A finished response: ids, mask (1 = model) and behaviour log-probs, all of one length."""

    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "stop"
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_log: list[tuple[str, bool]] = field(default_factory=list)  # (tool name, succeeded) per call
    policy_versions: list[int] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return sum(self.response_mask)

    @property
    def tool_tokens(self) -> int:
        return len(self.response_mask) - self.generated_tokens

    @property
    def policy_version(self) -> int:
        """The oldest version that produced any of its tokens (staleness is judged conservatively)."""
        return min(self.policy_versions) if self.policy_versions else 0

    def extend(self, ids: list[int], logprobs: list[float] | None) -> None:
        self.response_ids += ids
        self.response_mask += [1 if logprobs is not None else 0] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    def meta(self) -> dict[str, Any]:
        return {
            "turns": self.turns,
            "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors,
            "generated_tokens": self.generated_tokens,
            "tool_tokens": self.tool_tokens,
            "tool_token_ratio": round(self.tool_tokens / max(1, self.generated_tokens), 4),
            "finish_reason": self.finish_reason,
            "policy_version_last": max(self.policy_versions, default=0),
        }


def _truncate(tokenizer: Any, text: str, max_tokens: int) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens]) + TRUNCATED


def render_tool_turn(tokenizer: Any, answers: list[str], limits: EpisodeLimits, *, close_turn: bool) -> list[int]:
    """Token ids of the tool turn holding `answers` (each truncated to a share of the token limit)."""
    share = max(1, limits.max_tool_response_tokens // max(1, len(answers)))
    body = "\n".join(f"<tool_response>\n{_truncate(tokenizer, a, share)}\n</tool_response>" for a in answers)
    ids = tokenizer.encode(limits.turn_prefix + body + limits.turn_suffix, add_special_tokens=False)
    if close_turn and tokenizer.eos_token_id is not None:  # the model turn ended without its end token
        ids = [int(tokenizer.eos_token_id), *ids]
    return ids


async def run_episode(
    backend: GenerationBackend,
    prompt_ids: list[int],
    params: SampleParams,
    *,
    request_id: str,
    toolbox: ToolBox | None = None,
    limits: EpisodeLimits = EpisodeLimits(),
) -> Episode:
    """Sample one response to `prompt_ids`, running tool calls between turns when `toolbox` is given."""
    episode = Episode()
    tokenizer = backend.tokenizer
    for turn in range(limits.max_turns):
        budget = min(
            params.max_tokens,
            limits.max_response_tokens - len(episode.response_ids),
            backend.max_model_len - len(prompt_ids) - len(episode.response_ids),
        )
        if budget <= 0:
            episode.finish_reason = "length"
            break
        gen = await backend.generate(
            prompt_ids + episode.response_ids, replace(params, max_tokens=budget), f"{request_id}-t{turn}"
        )
        episode.extend(gen.token_ids, gen.logprobs)
        episode.turns, episode.finish_reason = turn + 1, gen.finish_reason
        episode.policy_versions.append(gen.policy_version)
        if toolbox is None or gen.finish_reason != "stop":
            break
        calls = parse_tool_calls(tokenizer.decode(gen.token_ids, skip_special_tokens=False))
        if not calls:
            break
        if turn + 1 == limits.max_turns:
            episode.finish_reason = "max_turns"
            break
        answers = [await toolbox.run(call) for call in calls]
        episode.tool_calls += len(calls)
        episode.tool_errors += sum(not ok for _, ok in answers)
        episode.tool_log += [(call.name, ok) for call, (_, ok) in zip(calls, answers, strict=True)]
        ended = bool(gen.token_ids) and gen.token_ids[-1] in backend.eos_token_ids
        tool_ids = render_tool_turn(tokenizer, [text for text, _ in answers], limits, close_turn=not ended)
        room = limits.max_response_tokens - len(episode.response_ids)
        episode.extend(tool_ids[:room], None)
    return episode
