"""Specification of `LossConfig`: defaults are valid, every field is described,
ranges and combinations are validated with errors naming the field."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from student_trainer.loss.config import LossConfig

pytestmark = pytest.mark.timeout(60)


def _models(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _models(field.annotation)


def test_defaults_are_valid_sampled_reverse_kl_with_k0():
    cfg = LossConfig()
    assert cfg.divergence == "rkl_sampled" and cfg.distill_weight == 1.0 and cfg.rl_weight == 0.0


def test_every_field_of_every_sub_config_has_a_description():
    for model in _models(LossConfig):
        for name, field in model.model_fields.items():
            sub_config = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            assert sub_config or field.description, f"{model.__name__}.{name} has no description"


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"divergence": "kl"}, "divergence"),
        ({"jsd_beta": 1.0}, "jsd_beta"),
        ({"student_temperature": 0.0}, "student_temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"discount": 1.5}, "discount"),
        ({"token_selection": {"keep_fraction": 0.0}}, "keep_fraction"),
        ({"reward_softmax": {"beta": -1.0}}, "beta"),
        ({"pass_rate": {"floor": 2.0}}, "floor"),
        ({"policy_gradient": {"clip_low": 1.0}}, "clip_low"),
        ({"chunk_sise": 4}, "chunk_sise"),
    ],
)
def test_out_of_range_values_and_unknown_fields_are_rejected_naming_the_field(overrides, field):
    with pytest.raises(ValidationError, match=field):
        LossConfig(**overrides)


@pytest.mark.parametrize(
    "overrides,named",
    [
        ({"distill_weight": 0.0, "rl_weight": 0.0}, "rl_weight"),
        ({"divergence": "jsd", "discount": 0.9}, "discount"),
        ({"schedule": {"mode": "linear", "blend_start_step": 5, "blend_end_step": 5}}, "blend_end_step"),
    ],
)
def test_bad_combinations_raise_value_error_naming_the_field(overrides, named):
    with pytest.raises(ValueError, match=named):
        LossConfig(**overrides)


def test_config_round_trips_through_a_plain_dict_as_yaml_would_give_it():
    cfg = LossConfig(
        divergence="fkl_to_rkl",
        schedule={"mode": "linear", "blend_end_step": 50},
        token_selection={"enabled": True, "keep_fraction": 0.3},
        rl_weight=0.5,
    )
    assert LossConfig.model_validate(cfg.model_dump()) == cfg
