"""The divergence registry: every row resolves, and config validation reads it, so a loss that needs what the
teacher will not send is refused when the config loads (not at the first step)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from opd.config import ConfigError, load_config
from student_trainer.config import TrainerConfig
from student_trainer.loss.config import LossConfig
from student_trainer.loss.registry import (
    BUCKETS,
    DIVERGENCES,
    SAMPLED,
    Divergence,
    TeacherNeed,
    divergence,
    teacher_needs,
)

pytestmark = pytest.mark.timeout(60)


def _load(*flags: str) -> TrainerConfig:
    return load_config(
        TrainerConfig, ["--model", "m", *flags], prog="opd train", description="", env_prefix="OPD_T__", environ={}
    )


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_every_builtin_row_resolves_to_its_function(name):
    row = DIVERGENCES[name]
    assert callable(row.function()) and row.function() is row.function()
    assert row.needs in (SAMPLED, BUCKETS)


def test_a_row_needs_the_sampled_token_alone_or_buckets():
    with pytest.raises(ValueError, match="SAMPLED_TOKEN"):
        Divergence(lambda *a: None, frozenset({TeacherNeed.SAMPLED_TOKEN, TeacherNeed.TOPK}))
    with pytest.raises(ValueError):
        Divergence(lambda *a: None, frozenset())


def test_unknown_divergence_names_the_registered_ones():
    with pytest.raises(ValidationError, match=r"divergence[\s\S]*unknown divergence 'kl'.*fkl.*rkl_sampled"):
        LossConfig(divergence="kl")


@pytest.mark.parametrize("divergence_name", ["fkl", "rkl", "jsd", "fkl_to_rkl"])
def test_top_k_zero_with_a_topk_divergence_is_refused_when_the_config_loads(divergence_name):
    with pytest.raises(
        ConfigError,
        match=r"teacher\.top_k=0 \(flag --teacher-top-k\).*"
        rf"loss\.divergence='{divergence_name}' with loss\.support='topk'",
    ):
        _load("--loss-divergence", divergence_name, "--teacher-top-k", "0")
    assert _load("--loss-divergence", divergence_name).teacher_top_k() == 20


def test_top_k_zero_with_topk_token_selection_jsd_is_refused_naming_the_setting():
    with pytest.raises(
        ValidationError,
        match=r"teacher\.top_k=0.*token_selection\.jsd_support='topk'.*"
        r"divergence_exponent=0",
    ):
        TrainerConfig(
            model="m", teacher={"top_k": 0}, loss={"token_selection": {"enabled": True, "divergence_exponent": 1.0}}
        )


def test_a_sampled_token_divergence_needs_no_top_k():
    config = _load("--loss-divergence", "rkl_sampled", "--teacher-top-k", "0")
    assert config.teacher_top_k() == 0 and teacher_needs(config.loss) == {TeacherNeed.SAMPLED_TOKEN}
    assert _load("--loss-divergence", "rkl_sampled").teacher_top_k() == 0


def test_full_vocabulary_support_loads_and_asks_the_teacher_for_the_full_vocabulary():
    config = TrainerConfig(model="m", loss={"divergence": "jsd", "support": "full"})
    assert TeacherNeed.FULL in teacher_needs(config.loss)


def test_a_new_row_is_validated_by_what_it_needs(monkeypatch):
    monkeypatch.setitem(DIVERGENCES, "full_only", Divergence(lambda *a: None, frozenset({TeacherNeed.FULL})))
    monkeypatch.setitem(DIVERGENCES, "per_token", Divergence(lambda *a: None, SAMPLED))
    with pytest.raises(ValidationError, match="divergence='full_only' cannot use support='topk'.*full"):
        LossConfig(divergence="full_only")
    assert teacher_needs(LossConfig(divergence="full_only", support="full")) >= {TeacherNeed.FULL}
    assert LossConfig(divergence="per_token", discount=0.9).discount == 0.9  # discount: any sampled-token row
    assert divergence("per_token").sampled and not divergence("full_only").sampled


def test_loss_config_and_registry_load_without_torch():
    code = (
        "import sys, student_trainer.config, student_trainer.loss.registry; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
