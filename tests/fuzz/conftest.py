"""A teacher to fuzz (real gRPC and ops HTTP on 127.0.0.1, the `hf` backend on the tiny model) and the budget.

The suite runs a small, deterministic budget per target (`opd-fuzz` profile: tens of cases, derandomized, no
example database); `opd bench fuzz` runs the same strategies and oracles at >= 10,000 cases. After every
test the server must still be serving: gRPC health, Info and a valid Score.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, settings

from opd_apps.bench.fuzz import fuzz_teacher_config, limits_of, still_serving
from teacher_server.server import ServerThread

settings.register_profile(
    "opd-fuzz",
    max_examples=30,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@pytest.fixture(scope="session")
def fuzz_teacher(tiny_model_dir):
    server = ServerThread(fuzz_teacher_config(str(tiny_model_dir))).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def limits(fuzz_teacher):
    return limits_of(fuzz_teacher)


@pytest.fixture(scope="session")
def channel(fuzz_teacher):
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(fuzz_teacher.address, options=options) as ch:
        yield ch


@pytest.fixture(autouse=True)
def keeps_serving(request):
    """After a test that used the fuzzed teacher, it still answers health, Info and a valid Score."""
    yield
    if "fuzz_teacher" in request.fixturenames:
        server = request.getfixturevalue("fuzz_teacher")
        assert still_serving(server.address, limits_of(server)), "the teacher stopped serving after the fuzz cases"
