"""Admission of training prompts by policy version: the rule's arithmetic and the heartbeat value's codec.

The rule: a group fed when n groups are untrained, the trainer has done S steps and the oldest live worker has
loaded v is trained by version S + floor(n / G) and sampled at v or later, so it is admitted only while
n < G * (max_staleness + 1 - max(0, S - v)).
"""

from __future__ import annotations

import msgpack
import pytest

from protos.heartbeat import WorkerHeartbeat
from protos.records import RecordError
from student_trainer.groups.admission import Admission


def _version_rule(max_staleness: int = 4, groups: int = 4, cap: int | None = None) -> Admission:
    return Admission("version", groups, max_staleness, prefetch_depth=1, max_inflight=cap)


def test_the_workers_lag_takes_away_the_steps_it_costs():
    rule = _version_rule()
    # workers at the trainer's version: 5 steps' worth of groups (lags 0..4)
    assert rule.room(untrained=0, inflight=0, trainer_step=10, oldest_version=10) == 20
    # two versions behind: every group is two versions older when trained, so two steps' worth fewer
    assert rule.room(untrained=0, inflight=0, trainer_step=10, oldest_version=8) == 12
    assert rule.room(untrained=11, inflight=5, trainer_step=10, oldest_version=8) == 1
    # five versions behind: anything fed now would be stale when trained
    assert rule.room(untrained=0, inflight=0, trainer_step=10, oldest_version=5) == 0


@pytest.mark.parametrize("lag", range(0, 5))
def test_every_group_admitted_is_trained_within_the_bound(lag):
    """Feed to the bound, then train groups in feed order: no group's lag exceeds max_staleness."""
    g, ms, step = 4, 4, 7
    rule = _version_rule(ms, g)
    admitted = rule.room(untrained=0, inflight=0, trainer_step=step, oldest_version=step - lag)
    trained_at = [step + i // g for i in range(admitted)]  # group i trained by the step floor(i / G) ahead
    assert admitted > 0 and max(t - (step - lag) for t in trained_at) <= ms
    one_more = step + admitted // g  # the next group would be one step too late
    assert one_more - (step - lag) > ms


def test_synchronous_mode_admits_one_step_only_at_the_trainers_version():
    rule = _version_rule(max_staleness=0)
    assert rule.room(untrained=0, inflight=0, trainer_step=3, oldest_version=3) == 4
    assert rule.room(untrained=0, inflight=0, trainer_step=3, oldest_version=2) == 0  # wait for the workers
    assert rule.room(untrained=4, inflight=0, trainer_step=3, oldest_version=3) == 0  # wait for the step


def test_without_versions_reported_workers_are_taken_to_sample_the_current_version():
    rule = _version_rule()
    assert rule.room(untrained=0, inflight=0, trainer_step=9, oldest_version=None) == 20
    # a worker ahead of a trainer resumed from an older checkpoint costs nothing
    assert rule.room(untrained=0, inflight=0, trainer_step=2, oldest_version=9) == 20


def test_publishing_every_second_step_counts_the_versions_the_groups_will_meet():
    rule = Admission("version", 4, 0, prefetch_depth=0, publish_every=2)
    # step 1 done, v0 still current (v2 comes after step 2): the next step trains at v0, so one step's groups
    assert rule.room(untrained=0, inflight=0, trainer_step=1, oldest_version=0) == 4
    rule = Admission("version", 4, 2, prefetch_depth=0, publish_every=2)
    # steps ahead train at v0, v2, v2, v4: the first three within 2 of v0
    assert rule.room(untrained=0, inflight=0, trainer_step=1, oldest_version=0) == 12


def test_max_inflight_groups_caps_either_rule_and_the_older_rule_ignores_versions():
    assert _version_rule(cap=6).room(untrained=8, inflight=4, trainer_step=0, oldest_version=0) == 2
    older = Admission("inflight", 4, 4, prefetch_depth=1)
    assert older.inflight_bound() == 12  # groups_per_step * max(1, max_staleness - prefetch_depth)
    assert older.room(untrained=30, inflight=5, trainer_step=10, oldest_version=0) == 7


def test_heartbeat_values_old_and_new_decode():
    assert WorkerHeartbeat.decode(b"1") == WorkerHeartbeat(None)  # schema 0: the bare "1" of older workers
    assert WorkerHeartbeat.decode(WorkerHeartbeat(7).encode()).policy_version == 7
    assert WorkerHeartbeat.decode(WorkerHeartbeat(None).encode()).policy_version is None


@pytest.mark.parametrize(
    ("value", "names"),
    [
        (b"\xc1", "valid msgpack"),
        (msgpack.packb([1]), "msgpack map"),
        (msgpack.packb({"schema": 2, "policy_version": 1}), "schema"),
        (msgpack.packb({"schema": 1, "policy_version": -1}), "policy_version"),
        (msgpack.packb({"schema": 1, "policy_version": "3"}), "policy_version"),
        (msgpack.packb({"schema": 1, "policy_version": 1, "extra": 0}), "unknown field"),
    ],
)
def test_a_bad_heartbeat_value_is_refused_naming_what_is_wrong(value, names):
    with pytest.raises(RecordError, match=names):
        WorkerHeartbeat.decode(value)
