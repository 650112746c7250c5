"""Which fed prompts the trainer still expects a group for, and what happens to a prompt that yields none.

Owns the bookkeeping of the prompt feeder, as plain data (no I/O, so it is unit-tested alone and saved in the
checkpoint): each prompt id fed and not yet trained is *open* (in flight: queued, being sampled, or its group
partly in) or *taken* (its whole group was pulled by the trainer and waits in the prefetch queue). A prompt
leaves the ledger when the step that trained it ran. A prompt that will not produce a group (dead-lettered, no
group within `group_timeout_s`, gone from Redis across a restart, or its group dropped as stale) `failed`: it is
fed again under the same id, up to `max_refeeds` times, then recorded as lost with the reason.

In flight (what the feeder's bound counts) = open, not taken. Rollouts of one of this run's prompts are accepted
only while it is open, so a late copy of a prompt already trained (or lost) is never trained.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

# Why a prompt is fed again or lost: low-cardinality labels for the metrics and the audit file.
Reason = Literal["dead_lettered", "timeout", "missing", "stale"]
REASONS: tuple[Reason, ...] = ("dead_lettered", "timeout", "missing", "stale")


@dataclass
class FeedStats:
    """Prompts fed again and lost, by reason (exported as `opd_trainer_prompts_{refed,lost}_total`)."""

    refed: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)


@dataclass
class OpenPrompt:
    refeeds: int = 0  # times fed again so far
    fed_at: float = 0.0  # monotonic time of the last (re)feed: group_timeout_s counts from here
    entry_id: str | None = None  # the `{ns}:prompts` entry of the latest copy (None: not known)
    taken: bool = False  # its group was pulled by the trainer and is not trained yet


@dataclass(frozen=True)
class Outcome:
    """What `failed` decided: feed the prompt again (`refeed`), or it is lost; `refeeds` counts the refeeds."""

    prompt_id: str
    action: Literal["refeed", "lost"]
    reason: Reason
    detail: str
    refeeds: int


class PromptLedger:
    def __init__(self, max_refeeds: int, group_timeout_s: float) -> None:
        self.max_refeeds, self.group_timeout_s = max_refeeds, group_timeout_s
        self.open: dict[str, OpenPrompt] = {}
        self.lost: dict[str, str] = {}  # prompt id -> reason

    @property
    def inflight(self) -> int:
        return sum(1 for p in self.open.values() if not p.taken)

    def fed(self, prompt_id: str, entry_id: str | None, now: float) -> None:
        """A prompt was fed (first time, or again: its refeed count is kept)."""
        entry = self.open.setdefault(prompt_id, OpenPrompt())
        entry.fed_at, entry.entry_id, entry.taken = now, entry_id, False

    def accepts(self, prompt_id: str) -> bool:
        """Whether a rollout of this (ledger-tracked) prompt may still join a group."""
        entry = self.open.get(prompt_id)
        return entry is not None and not entry.taken

    def taken(self, prompt_id: str) -> None:
        if prompt_id in self.open:
            self.open[prompt_id].taken = True

    def trained(self, prompt_id: str) -> None:
        self.open.pop(prompt_id, None)

    def failed(self, prompt_id: str, reason: Reason, detail: str) -> Outcome | None:
        """The prompt will not produce a group: refeed it or, past `max_refeeds`, lose it (None: not open)."""
        entry = self.open.get(prompt_id)
        if entry is None:
            return None
        if entry.refeeds >= self.max_refeeds:
            del self.open[prompt_id]
            self.lost[prompt_id] = reason
            return Outcome(prompt_id, "lost", reason, detail, entry.refeeds)
        entry.refeeds += 1
        entry.taken = False
        return Outcome(prompt_id, "refeed", reason, detail, entry.refeeds)

    def overdue(self, now: float) -> list[str]:
        """Open prompts (not taken) fed more than `group_timeout_s` ago."""
        return [pid for pid, p in self.open.items() if not p.taken and now - p.fed_at > self.group_timeout_s]

    # -- checkpoint -------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the prompts not trained yet (open or taken) with their refeeds, and the lost."""
        return {"open": {pid: p.refeeds for pid, p in self.open.items()}, "lost": dict(self.lost)}

    def restore(self, state: dict[str, Any], now: float) -> None:
        """Back to a checkpoint's ledger: every prompt not trained then is open again, its timeout restarted."""
        self.open = {pid: OpenPrompt(refeeds=n, fed_at=now) for pid, n in state.get("open", {}).items()}
        self.lost = dict(state.get("lost", {}))
