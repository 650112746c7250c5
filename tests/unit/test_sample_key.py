"""What "trained exactly once" is counted by: (prompt id, sample index), whichever copy of the prompt sampled it."""

from __future__ import annotations

import dataclasses

import pytest

from opd.stream_consumer import sample_key
from protos.records import RecordError
from student_trainer.settlement import key_of_rollout_id as _key_of_rollout_id
from tests.fixtures.rollout import make_rollout


def test_two_copies_of_a_prompt_have_the_same_sample_keys() -> None:
    first = dataclasses.replace(make_rollout(0, prompt_id="q@eval3"), rollout_id="q@eval3@17-0/2")
    second = dataclasses.replace(first, rollout_id="q@eval3@99-1/2")
    assert sample_key(first) == sample_key(second) == "q@eval3/2"
    assert _key_of_rollout_id("q@eval3@17-0/2") == "q@eval3/2"  # from a checkpoint's rollout ids
    assert _key_of_rollout_id("g0/0") == "g0/0"


def test_the_sample_index_comes_from_meta_when_the_rollout_id_has_none() -> None:
    record = dataclasses.replace(make_rollout(0, prompt_id="p"), rollout_id="custom-id", meta={"sample_index": 3})
    assert sample_key(record) == "p/3"
    with pytest.raises(RecordError, match="no sample index"):
        sample_key(dataclasses.replace(record, meta={}))
