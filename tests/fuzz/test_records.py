"""Fuzzing the Redis record decoders: any bytes, any msgpack, mutated valid records -> a record or RecordError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import example, given, settings

from tests.fuzz.oracles.records import record_payloads, run_decoders

pytestmark = pytest.mark.timeout(120)


@settings(settings.get_profile("opd-fuzz"), max_examples=100)
@given(record_payloads())
@example(msgpack.packb({"schema": 1, b"bytes-key": 1, "text-key": 2}, use_bin_type=True))  # unknown keys of two types
@example(msgpack.packb({"schema": 1.0, "version": 1, "uri": "u"}))  # a float schema is not schema 1
def test_decoders_return_a_record_or_raise_record_error(payload):
    statuses = run_decoders(payload)
    assert len(statuses) == 3 and set(statuses) <= {"decoded", "RecordError"}


def test_a_float_schema_is_refused_naming_the_field():
    from protos.records import PolicyAnnouncement, RecordError

    with pytest.raises(RecordError, match=r"policy announcement\.schema"):
        PolicyAnnouncement.decode(msgpack.packb({"schema": 1.0, "version": 1, "uri": "u"}))


def test_unknown_keys_of_mixed_types_are_named():
    from protos.records import PolicyAnnouncement, RecordError

    data = msgpack.packb({"schema": 1, "version": 1, "uri": "u", b"raw": 1, "text": 2}, use_bin_type=True)
    with pytest.raises(RecordError, match=r"unknown field\(s\) .*raw.*text|unknown field\(s\) .*text.*raw"):
        PolicyAnnouncement.decode(data)
