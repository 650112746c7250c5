"""Fixtures of the fault-injection tests: the tiny models, one teacher process they share, a pipeline per test.

Every test gets its own Redis (AOF, `appendfsync always`) in its temporary
directory and its own rollout worker(s) and trainer; the teacher process is
shared by the tests that do not kill it. Whatever a test does, every process
it started is stopped when it ends.
"""

from __future__ import annotations

import pytest

from tests.fixtures.faults import AofRedis, Pipeline, TinyRun, wait_for
from tests.fixtures.run_audit import PromptTap


def teacher_ready(address: str) -> bool:
    """The teacher answers its gRPC health check with SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def start_teacher(pipeline: Pipeline, port: int | None = None, timeout_s: float = 180):
    proc = pipeline.teacher(port).start()
    wait_for(lambda: teacher_ready(proc.address) or not proc.alive(), timeout_s, "the teacher to serve")
    assert proc.alive(), proc.tail()
    return proc


@pytest.fixture(scope="package")
def shared_teacher(tmp_path_factory, tiny_model_dir, tiny_llama_dir):
    """One `opd teacher` (hf backend, the tiny Llama) for the tests that do not kill the teacher."""
    root = tmp_path_factory.mktemp("fault-teacher")
    holder = Pipeline(root, tiny_model_dir, tiny_llama_dir, redis=None, run=TinyRun())
    proc = start_teacher(holder)
    yield proc
    holder.close()


@pytest.fixture
def appendfsync() -> str:
    """The AOF fsync policy of the test's Redis (a test may parametrize it)."""
    return "always"


@pytest.fixture
def pipeline(tmp_path, tiny_model_dir, tiny_llama_dir, appendfsync):
    """A tiny run's pipeline (student: the tiny Qwen2; teacher model: the tiny Llama) over a private AOF Redis."""
    redis = AofRedis(tmp_path / "redis", tmp_path / "logs", appendfsync).start()
    pipe = Pipeline(tmp_path, tiny_model_dir, tiny_llama_dir, redis=redis, run=TinyRun())
    pipe.processes.append(redis.process)  # stopped last
    pipe.tap = PromptTap(redis.url, pipe.namespace).start()  # every prompt fed, across restarts
    yield pipe
    pipe.tap.stop()
    pipe.close()
