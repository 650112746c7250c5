"""Shared test fixtures: tiny models, a private Redis server, per-test namespaces, CPU vLLM settings."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

# vLLM's CPU build: a small KV cache (the default reserves most of RAM), both cores, no compile for tests.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Qwen2-style float32 model + offline tokenizer (vocab 384, head_dim 64)."""
    from tests.fixtures.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama-style float32 model with the same tokenizer as `tiny_model_dir`."""
    from tests.fixtures.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=1)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a private Redis server started for this test session."""
    from opd.redis_server import redis_server

    with redis_server() as url:
        yield url


@pytest.fixture
def namespace() -> str:
    """A fresh key namespace per test, so tests sharing the Redis server never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
