"""The trainer's teacher token from a file (teacher.token_file, a mounted Secret): used for scoring, errors named."""

from __future__ import annotations

import httpx
import pytest
import yaml

from opd.config import ConfigError, validate_config
from opd.loop_thread import LoopThread
from student_trainer.config import TrainerConfig
from student_trainer.score_sources.grpc_teacher import TeacherServiceSource
from teacher_server.client import Unauthenticated
from tests.fixtures.rollout import make_rollout
from tests.fixtures.teacher import start_teacher

pytestmark = pytest.mark.timeout(180)

TOKEN = "planted-team-token-4b1e"


@pytest.fixture(scope="module")
def teacher_with_tokens(tiny_model_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"student-a": TOKEN}))
    server = start_teacher(tiny_model_dir, "hf", auth={"tokens_file": str(tokens)})
    yield server
    server.stop()


@pytest.fixture
def io():
    loop = LoopThread("test-token-file-io")
    yield loop
    loop.stop()


def _config(address: str, token_file) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "model": "m",
            "teacher": {"addresses": [address], "token_file": str(token_file)},
            "loss": {"divergence": "fkl"},
        }
    )


def test_the_token_in_the_file_authenticates_the_trainer(teacher_with_tokens, io, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # as `kubectl create secret --from-file` keeps a trailing newline
    source = TeacherServiceSource(_config(teacher_with_tokens.address, token_file), io)
    try:
        scores = source.fetch([make_rollout(0)]).result(timeout=60)
    finally:
        source.close()
    assert set(scores) == {"p/0"}
    metrics = httpx.get(f"{teacher_with_tokens.ops_url}/metrics", timeout=10).text
    assert 'opd_teacher_requests_total{client="student-a",code="OK",rpc="ScoreStream"} 1.0' in metrics


def test_a_wrong_token_in_the_file_is_refused_by_the_teacher(teacher_with_tokens, io, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("not-the-token")
    source = TeacherServiceSource(_config(teacher_with_tokens.address, token_file), io)
    try:
        with pytest.raises(Unauthenticated):
            source.fetch([make_rollout(0)]).result(timeout=60)
    finally:
        source.close()


def test_unreadable_or_empty_files_and_both_options_are_config_errors(tmp_path, io):
    with pytest.raises(ConfigError, match=r"teacher.token_file '.*missing' cannot be read"):
        TeacherServiceSource(_config("127.0.0.1:1", tmp_path / "missing"), io)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"teacher.token_file '.*empty' is empty"):
        TeacherServiceSource(_config("127.0.0.1:1", empty), io)
    with pytest.raises(ConfigError, match="teacher.token and teacher.token_file are both set"):
        validate_config(TrainerConfig, {"model": "m", "teacher": {"token": "x", "token_file": str(empty)}})
