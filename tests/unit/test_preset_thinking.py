"""The OPSD preset turns Qwen3 thinking off: the rollout worker renders the thinking-off prompt under it.

The recipe forces `enable_thinking=False` on Qwen prompts (train_opd.sh lines 52-57, 166), which Qwen3's chat
template turns into an empty think block after the generation prompt. The tokenizer here is the tests' offline
one with the tail of Qwen3's template (the same branch on `enable_thinking`), so the test needs no download; the
worker is built around it (its Redis client is never connected: rendering reads no stream).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from opd.config import load_config
from protos.records import PromptRecord
from rollout_workers.config import RolloutConfig
from rollout_workers.engine_hf import HFBackend
from rollout_workers.worker import RolloutWorker
from tests.fixtures.tiny_models import build_tokenizer

pytestmark = pytest.mark.timeout(60)

PRESET = Path(__file__).resolve().parents[2] / "deploy" / "presets" / "rollout-opsd.yaml"

# Qwen3's chat template, reduced to plain user/assistant turns; the generation prompt's tail is Qwen3's own.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
QUESTION = "What is 2 + 3? Let's think step by step and output the final answer within \\boxed{}."
THINKING_OFF = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
THINKING_ON = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def _worker(argv: list[str]) -> RolloutWorker:
    config = load_config(
        RolloutConfig, ["--model", "/models/unused", *argv], prog="opd rollout", description="", env_prefix="X__"
    )
    tokenizer = build_tokenizer()
    tokenizer.chat_template = QWEN3_TEMPLATE
    backend = HFBackend(model=None, tokenizer=tokenizer, max_model_len=4096)
    return RolloutWorker(config, backend, aioredis.Redis.from_url("redis://127.0.0.1:1/0"))


def _rendered(worker: RolloutWorker) -> str:
    record = PromptRecord("p0", messages=[{"role": "user", "content": QUESTION}])
    return worker.backend.tokenizer.decode(worker._render(record))


def test_the_opsd_preset_renders_the_thinking_off_prompt():
    worker = _worker(["--config", str(PRESET)])
    assert worker.config.enable_thinking is False
    assert _rendered(worker) == THINKING_OFF


def test_the_default_renders_the_templates_own_prompt_with_thinking_on():
    worker = _worker([])
    assert worker.config.enable_thinking is None
    assert _rendered(worker) == THINKING_ON
