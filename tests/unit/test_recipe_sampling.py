"""Recipe: rollout records carry the worker's sampling settings (schema 3) and rewards that failed arrive
as None; the trainer refuses, by default, a rollout sampled otherwise than its loss assumes, naming both values."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest

from opd.stream_consumer import Entry
from opd.streams import RedisConfig, connect
from protos.records import ROLLOUT_SCHEMA, PromptRecord, RolloutRecord
from rollout_workers.episode import Episode
from rollout_workers.worker import RolloutWorker
from student_trainer.config import TrainerConfig
from student_trainer.step import SamplingCheck, SamplingMismatch
from tests.fixtures.rollout import make_rollout, rollout_config

pytestmark = pytest.mark.timeout(60)


def sampled(temperature: float | None, top_p: float | None = 1.0, index: int = 0) -> RolloutRecord:
    record = make_rollout(index)
    record.sampling_temperature, record.sampling_top_p = temperature, top_p
    return record


def test_schema_3_records_carry_temperature_and_top_p():
    assert ROLLOUT_SCHEMA == 3
    decoded = RolloutRecord.decode(sampled(0.7, 0.95).encode())
    assert (decoded.sampling_temperature, decoded.sampling_top_p) == (0.7, 0.95)


def test_schema_2_records_still_decode_with_the_settings_not_recorded():
    fields = msgpack.unpackb(sampled(0.7, 0.95).encode(), raw=False)
    fields.pop("sampling_temperature"), fields.pop("sampling_top_p")
    fields["schema"] = 2
    old = RolloutRecord.decode(msgpack.packb(fields, use_bin_type=True))
    assert old.sampling_temperature is None and old.sampling_top_p is None


def test_a_matching_rollout_passes_and_a_mismatched_one_is_refused_naming_both_values():
    check = SamplingCheck(student_temperature=1.0)
    check.check([sampled(1.0), sampled(1.0 + 1e-9)])
    with pytest.raises(SamplingMismatch) as err:
        check.check([sampled(1.0), sampled(0.6, index=3)])
    message = str(err.value)
    assert "'p/3'" in message and "temperature 0.6" in message and "assumes temperature 1" in message
    assert "batch.sampling_mismatch=warn" in message and "stays in Redis" in message


def test_a_nucleus_cut_is_refused_too():
    with pytest.raises(SamplingMismatch, match="top-p 0.9"):
        SamplingCheck(student_temperature=0.8).check([sampled(0.8, 0.9)])


def test_warn_logs_each_setting_once_and_unknown_settings_are_logged_not_refused(caplog):
    check = SamplingCheck(student_temperature=1.0, policy="warn")
    with caplog.at_level(logging.WARNING, logger="student_trainer.step"):
        check.check([sampled(0.6, index=i) for i in range(3)])
        SamplingCheck(student_temperature=1.0).check([sampled(None, None)])  # refuse, but unknown: logged
    assert caplog.text.count("temperature 0.6") == 1 and "cannot be checked" in caplog.text


def test_the_trainer_refuses_by_default():
    assert TrainerConfig(model="m").batch.sampling_mismatch == "refuse"


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def _worker(reward_fn, timeout_s: float) -> RolloutWorker:
    config = rollout_config(
        "unused",
        "redis://127.0.0.1:1",
        "ns",
        sampling={"temperature": 0.7, "top_p": 0.9},
        reward={"timeout_s": timeout_s},
    )
    backend = SimpleNamespace(name="test", tokenizer=_Tokenizer())
    return RolloutWorker(config, backend, connect(RedisConfig(url="redis://127.0.0.1:1")), reward_fn=reward_fn)


def _records(worker: RolloutWorker) -> list[RolloutRecord]:
    prompt = PromptRecord("q", group_size=1, prompt_ids=np.arange(3, dtype=np.int32), answer="1")
    episode = Episode(response_ids=[5, 6], response_mask=[1, 1], logprobs=[-0.1, -0.2], turns=1)
    return asyncio.run(worker._records(Entry("1-0", prompt), [1, 2, 3], [episode], 0.1))


def raising_reward(response: str, prompt: PromptRecord) -> float:
    raise ValueError("cannot parse")


def hanging_reward(response: str, prompt: PromptRecord) -> float:
    time.sleep(2.0)
    return 1.0


@pytest.mark.parametrize(("reward_fn", "error"), [(raising_reward, "ValueError"), (hanging_reward, "TimeoutError")])
def test_a_reward_that_raises_or_times_out_arrives_as_none_with_the_reason(reward_fn, error):
    (record,) = _records(_worker(reward_fn, timeout_s=0.2))
    assert record.reward is None and record.meta["reward_error"] == error
    decoded = RolloutRecord.decode(record.encode())
    assert decoded.reward is None and (decoded.sampling_temperature, decoded.sampling_top_p) == (0.7, 0.9)


def test_a_reward_that_works_arrives_with_the_sampling_settings():
    (record,) = _records(_worker(lambda text, prompt: 1.0, timeout_s=5.0))
    assert record.reward == 1.0 and "reward_error" not in record.meta
    assert (record.sampling_temperature, record.sampling_top_p) == (0.7, 0.9)
