"""Planted secrets (the teacher token, the Redis password) never leave a component: not through
`--print-config`, validation errors, the logs of a start, `/status` or any other ops route, nor the
config uploaded to Weights & Biases."""

from __future__ import annotations

import asyncio
import logging
import sys
import types

import httpx
import numpy as np
import pytest
import yaml

from opd.processes import free_port
from opd.redaction import REDACTED
from opd.redis_server import redis_server

pytestmark = pytest.mark.timeout(180)

TOKEN = "planted-teacher-token-5b2d"
REDIS_PW = "planted-redis-pw-91c3"
OPS_TOKEN = "planted-ops-token-e40a"
SECRETS = (TOKEN, REDIS_PW, OPS_TOKEN)


def assert_clean(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} shows a planted secret"


def _print_config(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--print-config"])
    assert done.value.code in (0, None)
    return capsys.readouterr().out


def test_print_config_of_every_component_redacts(tmp_path, monkeypatch, capsys):
    from rollout_workers.__main__ import main as rollout_main
    from student_trainer.__main__ import main as train_main
    from teacher_server.__main__ import main as teacher_main

    url = f"redis://default:{REDIS_PW}@redis.opd.svc:6379/0"
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"teacher": {"token": TOKEN}, "redis": {"url": url}}))
    out = _print_config(train_main, ["--config", str(preset), "--model", "m"], capsys)  # secrets from a preset
    assert_clean(out, "opd train --print-config (preset)")
    printed = yaml.safe_load(out)
    assert printed["teacher"]["token"] == REDACTED
    assert printed["redis"]["url"] == f"redis://default:{REDACTED}@redis.opd.svc:6379/0"  # host stays readable

    monkeypatch.setenv("OPD_TRAIN__TEACHER__TOKEN", TOKEN)  # secrets from the environment
    monkeypatch.setenv("OPD_TRAIN__REDIS__URL", url)
    assert_clean(_print_config(train_main, ["--model", "m"], capsys), "opd train --print-config (env)")
    monkeypatch.delenv("OPD_TRAIN__TEACHER__TOKEN")
    monkeypatch.delenv("OPD_TRAIN__REDIS__URL")
    out = _print_config(train_main, ["--model", "m", "--teacher-token", TOKEN, "--redis-url", url], capsys)
    assert_clean(out, "opd train --print-config (flags)")

    out = _print_config(rollout_main, ["--model", "m", "--redis-url", url], capsys)
    assert_clean(out, "opd rollout --print-config")
    assert yaml.safe_load(out)["redis"]["url"].startswith("redis://default:<redacted>@")

    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"alice": TOKEN}))
    monkeypatch.setenv("OPD_TEST_TOKENS", f"bob:{TOKEN}")
    out = _print_config(
        teacher_main,
        ["--model", "m", "--auth-tokens-file", str(tokens), "--auth-tokens-env", "OPD_TEST_TOKENS"],
        capsys,
    )
    assert_clean(out, "opd teacher --print-config")


def test_validation_errors_do_not_echo_secrets(capsys):
    from student_trainer.__main__ import main as train_main

    assert train_main(["--model", "m", "--redis-url", f"http://u:{REDIS_PW}@h/0"]) == 2
    err = capsys.readouterr().err
    assert "--redis-url" in err and "rediss://" in err  # still says what is wrong and how to fix it
    assert_clean(err, "a validation error")


def test_wandb_receives_a_redacted_config(monkeypatch):
    from student_trainer.config import LoggingConfig, TrainerConfig
    from student_trainer.metrics import StepLogger

    received = {}
    fake = types.ModuleType("wandb")  # the W&B client is not installed here; record what would be uploaded
    fake.init = lambda **kwargs: received.update(kwargs) or types.SimpleNamespace(log=lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = TrainerConfig(
        model="m",
        teacher={"token": TOKEN},
        redis={"url": f"redis://:{REDIS_PW}@r:6379/0"},
        ops={"tokens_file": "/etc/opd/ops-tokens.yaml"},
    )
    StepLogger(LoggingConfig(wandb_project="p"), run, is_main=True)
    config = received["config"]
    assert_clean(yaml.safe_dump(config), "the W&B config")
    assert config["teacher"]["token"] == REDACTED and config["model"] == "m"
    assert run.teacher.token == TOKEN  # the trainer itself still has it


def test_a_trainer_and_its_teacher_start_without_leaking(tiny_model_dir, tmp_path, caplog):
    """A teacher with the planted token; a trainer that uses it, with the planted Redis password and ops token:
    every log record of both starts, and every ops route of the trainer, are free of them."""
    from opd.loop_thread import LoopThread
    from student_trainer.config import TrainerConfig
    from student_trainer.model import init_distributed
    from student_trainer.runtime import TrainerRuntime
    from teacher_server.client import TeacherClientSync, Unauthenticated
    from tests.fixtures.teacher import start_teacher
    from tests.integration.test_ops_auth import assert_every_route_guarded

    caplog.set_level(logging.DEBUG)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"student-a": TOKEN}))
    ops_tokens = tmp_path / "ops-tokens.yaml"
    ops_tokens.write_text(yaml.safe_dump({"viewer": OPS_TOKEN}))
    teacher = start_teacher(tiny_model_dir, "hf", auth={"tokens_file": str(tokens)})
    io = LoopThread("test-secrets-io")
    try:
        # a wrong token is refused; the refusal logs no token either
        with (
            TeacherClientSync(teacher.address, token=TOKEN[:-1], timeout_s=10) as client,
            pytest.raises(Unauthenticated),
        ):
            client.score(np.arange(1, 6), 2)
        with redis_server(password=REDIS_PW) as redis_url:
            config = TrainerConfig.model_validate(
                {
                    "model": str(tiny_model_dir),
                    "teacher": {"addresses": [teacher.address], "token": TOKEN},
                    "redis": {"url": redis_url, "namespace": "secrets"},
                    "loss": {"divergence": "fkl"},
                    "checkpoint": {"dir": str(tmp_path / "ck")},
                    "publish": {"uri": str(tmp_path / "weights")},
                    "ops": {"host": "127.0.0.1", "port": free_port(), "tokens_file": str(ops_tokens)},
                    "max_steps": 1,
                }
            )
            runtime = TrainerRuntime(config, init_distributed(config.dist), io)
            try:
                runtime.start()
                base = f"http://127.0.0.1:{runtime.ops_port}"
                status = httpx.get(f"{base}/status", headers={"Authorization": f"Bearer {OPS_TOKEN}"})
                assert status.status_code == 200
                assert_clean(status.text, "/status")
                assert_every_route_guarded(base, runtime._ops.app, token=OPS_TOKEN)
            finally:
                runtime.close()
    finally:
        io.stop()
        teacher.stop()
    assert "trainer ready" in caplog.text and "serving gRPC" in caplog.text  # the starts were logged
    assert_clean(caplog.text, "the logs")
    for record in caplog.records:
        assert_clean(repr(record.args) + str(record.exc_info), "a log record's arguments")


async def test_a_rollout_worker_start_does_not_log_the_redis_password(tiny_model_dir, caplog):
    from rollout_workers.worker import run_worker
    from tests.fixtures.rollout import rollout_config

    caplog.set_level(logging.DEBUG)
    with redis_server(password=REDIS_PW) as redis_url:
        config = rollout_config(tiny_model_dir, redis_url, "secrets", exit_when_drained=True)
        await asyncio.wait_for(run_worker(config, feed=[]), 60)  # starts, finds nothing to do, stops
    assert "worker" in caplog.text
    assert_clean(caplog.text, "the rollout worker's logs")
