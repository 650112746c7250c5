"""Eval rounds sample with their own settings, carried on prompt records (schema 3) to the workers."""

from __future__ import annotations

import msgpack
import pytest

from protos.records import PROMPT_SCHEMA, PromptRecord, RecordError
from rollout_workers.config import SamplingConfig
from rollout_workers.prompt_sampling import sampling_for
from student_trainer.config import TrainerConfig
from student_trainer.runtime import eval_records

pytestmark = pytest.mark.timeout(60)


def _record(**sampling) -> PromptRecord:
    return PromptRecord(prompt_id="p", split="eval", messages=[{"role": "user", "content": "q"}], **sampling)


def _raw(record: PromptRecord) -> dict:
    return msgpack.unpackb(record.encode(), raw=False)


def test_schema_3_prompt_records_carry_the_sampling_settings():
    assert PROMPT_SCHEMA == 3
    back = PromptRecord.decode(_record(sampling_temperature=0.6, sampling_top_p=0.8, sampling_top_k=20).encode())
    assert (back.sampling_temperature, back.sampling_top_p, back.sampling_top_k) == (0.6, 0.8, 20)
    plain = PromptRecord.decode(_record().encode())
    assert (plain.sampling_temperature, plain.sampling_top_p, plain.sampling_top_k) == (None, None, None)


@pytest.mark.parametrize("schema", [1, 2])
def test_older_prompt_records_still_decode_without_settings(schema):
    obj = {k: v for k, v in _raw(_record()).items() if not k.startswith("sampling_")}
    obj["schema"] = schema
    if schema == 1:
        obj.pop("teacher")
    back = PromptRecord.decode(msgpack.packb(obj, use_bin_type=True))
    assert back.prompt_id == "p" and back.sampling_temperature is None and back.sampling_top_k is None
    obj["sampling_temperature"] = 0.6  # a field schema 1/2 do not have
    with pytest.raises(RecordError, match="unknown field"):
        PromptRecord.decode(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("sampling_temperature", 0.0, "sampling_temperature: must be > 0"),
        ("sampling_top_p", 1.5, r"sampling_top_p: must be in \(0, 1\]"),
        ("sampling_top_k", 0, "sampling_top_k: must be -1"),
        ("sampling_top_k", 2.5, "sampling_top_k: expected int"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(field, value, match):
    obj = _raw(_record())
    obj[field] = value
    with pytest.raises(RecordError, match=match):
        PromptRecord.decode(msgpack.packb(obj, use_bin_type=True))


def test_a_worker_uses_the_records_settings_and_its_own_for_the_rest():
    worker = SamplingConfig(temperature=1.0, top_p=1.0, top_k=-1)
    got = sampling_for(_record(sampling_temperature=0.6, sampling_top_k=20), worker)
    assert (got.temperature, got.top_p, got.top_k) == (0.6, 1.0, 20)
    plain = sampling_for(_record(), worker)
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, -1)


def test_the_trainers_eval_prompts_carry_the_eval_settings_and_n(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"id": "a", "prompt": "1+1?", "answer": "2"}\n{"id": "b", "prompt": "2+2?", "answer": "4"}\n')
    config = TrainerConfig(
        model="m",
        data={"eval_prompts": str(path), "source": {"n_samples": 1}},
        eval={"every_steps": 1, "temperature": 0.6, "top_p": 0.8, "top_k": 20, "n": 16},
    )
    records = eval_records(config)
    assert [(r.split, r.group_size) for r in records] == [("eval", 16), ("eval", 16)]
    assert {(r.sampling_temperature, r.sampling_top_p, r.sampling_top_k) for r in records} == {(0.6, 0.8, 20)}
    unset = eval_records(TrainerConfig(model="m", data={"eval_prompts": str(path)}, eval={"every_steps": 1}))
    assert unset[0].sampling_temperature is None and unset[0].group_size == 1
