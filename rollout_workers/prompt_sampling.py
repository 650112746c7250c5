"""The sampling settings a worker uses for one prompt: the prompt record's own, else the worker's.

A prompt record (schema 3) may carry `sampling_temperature`, `sampling_top_p`
and `sampling_top_k`, as the trainer's eval rounds do (the recipe validates
at T 0.6, top-p 0.8, top-k 20 while training at T 1); each setting it leaves
nil is the worker's `--sampling-*` value. Owns only that choice: the
episode samples with the result and the rollout record reports it (its
`sampling_temperature` / `sampling_top_p`, which the trainer checks against
its loss for training rollouts). Imports no engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from protos.records import PromptRecord
from rollout_workers.config import SamplingConfig


@dataclass(frozen=True)
class PromptSampling:
    temperature: float
    top_p: float
    top_k: int  # -1 = off


def sampling_for(record: PromptRecord, worker: SamplingConfig) -> PromptSampling:
    """The record's settings where it sets them, the worker's elsewhere."""

    def pick(own, default):
        return default if own is None else own

    return PromptSampling(
        temperature=pick(record.sampling_temperature, worker.temperature),
        top_p=pick(record.sampling_top_p, worker.top_p),
        top_k=pick(record.sampling_top_k, worker.top_k),
    )
