"""A LoRA student trains its adapters only, its KL reference is the base with the adapter disabled,
it publishes the adapter, and its checkpoint resumes exactly (and is refused by a full-weight run)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_adapter_disabled_reference_equals_a_separately_loaded_frozen_base(lora_run):
    _, result = lora_run
    # The same float32 ops on the same base weights in the same order (the LoRA branch is skipped, not added as
    # zero), so the two agree to float32 rounding of a log-prob of magnitude < 20: atol 2e-5 (~ 20 * 2**-20).
    for disabled, separate, student in zip(result["disabled"], result["separate"], result["student"], strict=True):
        torch.testing.assert_close(disabled, separate, rtol=0, atol=2e-5)
        assert (student - separate).abs().max() > 1e-3  # the trained adapter (non-zero B) does change the policy


def test_only_the_adapters_train_and_resume_restores_them_with_their_optimizer_state(lora_run):
    _, result = lora_run
    assert result["params"] and all("lora_" in name for name in result["params"])
    assert any(v.abs().max() > 0 for n, v in result["params"].items() if "lora_B" in n)
    for name, value in result["params"].items():
        torch.testing.assert_close(result["params_resumed"][name], value, rtol=0, atol=0, msg=name)
        for key, state in result["optim"][name].items():
            torch.testing.assert_close(result["optim_resumed"][name][key], state, rtol=0, atol=0, msg=f"{name} {key}")


def test_a_full_weight_run_refuses_the_lora_checkpoint_with_a_clear_error(lora_run):
    _, result = lora_run
    assert "is of a LoRA student but this run trains a full-weight student" in result["refused"]


def test_a_published_version_is_the_adapter_and_the_identity_of_its_base(lora_run):
    out, result = lora_run
    version = out / "weights" / "v00000002"
    assert sorted(p.name for p in version.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "opd_base.json",
    ]
    assert json.loads((version / "opd_base.json").read_text()) == {"base_id": result["base_id"]}
    assert json.loads((version / "adapter_config.json").read_text())["r"] == 4
