"""The prompt feeder's ledger: what is in flight, what is fed again, what is lost, and what a checkpoint keeps."""

from __future__ import annotations

from student_trainer.groups.ledger import PromptLedger


def test_a_failing_prompt_is_fed_again_max_refeeds_times_then_lost() -> None:
    ledger = PromptLedger(max_refeeds=2, group_timeout_s=60)
    ledger.fed("p", "1-0", now=0.0)
    outcomes = [ledger.failed("p", "dead_lettered", "bad prompt") for _ in range(3)]
    assert [(o.action, o.refeeds) for o in outcomes] == [("refeed", 1), ("refeed", 2), ("lost", 2)]
    assert ledger.lost == {"p": "dead_lettered"} and "p" not in ledger.open
    assert ledger.failed("p", "timeout", "again") is None  # lost is final
    assert not ledger.accepts("p")


def test_in_flight_counts_open_prompts_whose_group_was_not_taken() -> None:
    ledger = PromptLedger(max_refeeds=1, group_timeout_s=60)
    for pid in ("a", "b", "c"):
        ledger.fed(pid, None, now=0.0)
    ledger.taken("a")
    ledger.trained("b")
    assert ledger.inflight == 1  # c; a waits in the prefetch queue, b is trained
    assert ledger.accepts("c") and not ledger.accepts("a") and not ledger.accepts("b")
    outcome = ledger.failed("a", "stale", "too old")  # a's group went stale: in flight again
    assert outcome.action == "refeed" and ledger.inflight == 2 and ledger.accepts("a")


def test_overdue_prompts_are_the_open_ones_fed_more_than_group_timeout_s_ago() -> None:
    ledger = PromptLedger(max_refeeds=1, group_timeout_s=10)
    ledger.fed("old", None, now=0.0)
    ledger.fed("new", None, now=5.0)
    ledger.fed("taken", None, now=0.0)
    ledger.taken("taken")
    assert ledger.overdue(now=12.0) == ["old"]
    ledger.failed("old", "timeout", "slow")
    ledger.fed("old", "2-0", now=12.0)  # fed again: its clock restarts, its refeed count stays
    assert ledger.overdue(now=16.0) == ["new"] and ledger.open["old"].refeeds == 1


def test_a_checkpoint_keeps_every_prompt_not_trained_with_its_refeeds() -> None:
    ledger = PromptLedger(max_refeeds=3, group_timeout_s=10)
    ledger.fed("a", "1-0", now=0.0)
    ledger.fed("b", "2-0", now=0.0)
    ledger.taken("b")
    ledger.failed("a", "timeout", "slow")
    ledger.fed("c", None, now=0.0)
    ledger.failed("c", "dead_lettered", "x")
    ledger.max_refeeds = 0
    ledger.failed("c", "dead_lettered", "x")  # lost
    state = ledger.state()
    assert state == {"open": {"a": 1, "b": 0}, "lost": {"c": "dead_lettered"}}
    restored = PromptLedger(max_refeeds=3, group_timeout_s=10)
    restored.restore(state, now=100.0)
    assert restored.inflight == 2 and restored.open["a"].refeeds == 1 and restored.open["b"].fed_at == 100.0
    assert restored.lost == {"c": "dead_lettered"}
