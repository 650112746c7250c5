"""With auth on, every ops route of every component but /healthz, /readyz and /metrics needs the token;
and a port open on all interfaces without auth is reported by exactly one warning."""

from __future__ import annotations

import asyncio
import base64
import logging

import httpx
import pytest
import yaml
from starlette.routing import Route

from opd.auth import BearerAuth, TokenTable
from opd.loop_thread import LoopThread
from opd.ops_app import OPEN_PATHS, OpsConfig, OpsServer, create_ops_app, ops_auth
from opd.processes import free_port
from tests.fixtures.teacher import start_teacher

pytestmark = pytest.mark.timeout(180)

TOKEN = "planted-ops-token-7f3a"


def _tokens_file(tmp_path, **clients: str) -> str:
    path = tmp_path / "ops-tokens.yaml"
    path.write_text(yaml.safe_dump(clients))
    return str(path)


def _routes(app) -> list[tuple[str, str]]:
    out = []
    for route in app.routes:
        if isinstance(route, Route):
            out += [(method, route.path) for method in sorted(route.methods or ()) if method != "HEAD"]
    return out


def assert_every_route_guarded(base_url: str, app, token: str = TOKEN, **client_kwargs) -> list[str]:
    """Probe routes answer without a token and show no token; every other route is 401 without a valid one."""
    routes = _routes(app)
    paths = {path for _, path in routes}
    assert paths >= OPEN_PATHS and len(paths) > len(OPEN_PATHS)
    checked = []
    with httpx.Client(base_url=base_url, timeout=60, **client_kwargs) as http:
        for method, path in routes:
            anonymous = http.request(method, path, json={} if method == "POST" else None)
            if path in OPEN_PATHS:
                assert anonymous.status_code in (200, 503), (method, path, anonymous.status_code)
                assert token not in anonymous.text
                continue
            assert anonymous.status_code == 401, f"{method} {path} answered {anonymous.status_code} without a token"
            assert "Bearer" in anonymous.headers["www-authenticate"]
            wrong = http.request(method, path, headers={"Authorization": "Bearer not-the-token"})
            assert wrong.status_code == 401, f"{method} {path} accepted a wrong token"
            good = http.request(
                method, path, headers={"Authorization": f"Bearer {token}"}, json={} if method == "POST" else None
            )
            assert good.status_code != 401, f"{method} {path} refused the right token"
            assert token not in good.text
            checked.append(f"{method} {path}")
    return checked


def test_teacher_ops_routes_need_its_token(tiny_model_dir, tmp_path):
    server = start_teacher(tiny_model_dir, "hf", auth={"tokens_file": _tokens_file(tmp_path, alice=TOKEN)})
    try:
        checked = assert_every_route_guarded(server.ops_url, server.server._ops.app)
        assert {"GET /v1/info", "POST /v1/score", "GET /docs", "GET /openapi.json"} <= set(checked)
        ok = httpx.post(
            f"{server.ops_url}/v1/score",
            json={"token_ids": [1, 2, 3], "score_from": 1},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert ok.status_code == 200 and len(ok.json()["token_logprobs"]) == 2
    finally:
        server.stop()


def test_trainer_ops_routes_need_the_ops_token(tmp_path):
    from student_trainer.metrics import TrainerMetrics, TrainerStatus
    from student_trainer.runtime import trainer_ops_app

    auth = ops_auth(OpsConfig(tokens_file=_tokens_file(tmp_path, viewer=TOKEN)))
    app = trainer_ops_app(TrainerStatus(step=3).snapshot, TrainerMetrics().registry, lambda: True, auth=auth)
    io = LoopThread()
    server = OpsServer(app, "127.0.0.1", 0)
    try:
        port = io.call(server.start())
        checked = assert_every_route_guarded(f"http://127.0.0.1:{port}", app)
        assert {"GET /status", "GET /", "GET /static/chart.js"} <= set(checked)
        # The live page in a browser: HTTP Basic with the token as password works for the page and its fetches.
        basic = base64.b64encode(f"me:{TOKEN}".encode()).decode()
        status = httpx.get(f"http://127.0.0.1:{port}/status", headers={"Authorization": f"Basic {basic}"})
        assert status.status_code == 200 and status.json()["step"] == 3
    finally:
        io.call(server.stop())
        io.stop()


async def test_rollout_worker_serves_its_ops_routes_with_the_ops_token(tiny_model_dir, redis_url, namespace, tmp_path):
    from rollout_workers.worker import run_worker
    from tests.fixtures.rollout import rollout_config

    port = free_port()
    config = rollout_config(
        tiny_model_dir,
        redis_url,
        namespace,
        exit_when_drained=False,
        ops={"host": "127.0.0.1", "port": port, "tokens_file": _tokens_file(tmp_path, viewer=TOKEN)},
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(config, stop=stop))
    try:
        app = await _served_app(port, task)
        await asyncio.to_thread(assert_every_route_guarded, f"http://127.0.0.1:{port}", app)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def _served_app(port: int, task: asyncio.Task, deadline_s: float = 60.0):
    """The worker's ops app, once its port answers (the same app object is rebuilt from the factory)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    async with httpx.AsyncClient() as http:
        while True:
            if task.done():
                task.result()
                raise AssertionError("the worker exited before its ops port answered")
            try:
                if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert loop.time() < deadline, "the worker's ops port did not answer"
            await asyncio.sleep(0.1)
        spec = (
            await http.get(f"http://127.0.0.1:{port}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
        ).json()
    from prometheus_client import CollectorRegistry

    app = create_ops_app("rollout", CollectorRegistry(), lambda: True)
    assert set(spec["paths"]) == {r.path for r in app.routes if isinstance(r, Route) and r.include_in_schema}
    return app


# -- the open-port warning ------------------------------------------------------------------------------


def _open_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and "all interfaces" in r.getMessage()]


def test_teacher_on_all_interfaces_without_auth_warns_once(tiny_model_dir, caplog):
    caplog.set_level(logging.WARNING)
    server = start_teacher(tiny_model_dir, "hf", grpc={"host": "0.0.0.0"}, ops={"host": "0.0.0.0"})
    server.stop()
    (record,) = _open_warnings(caplog)
    message = record.getMessage()
    assert f"gRPC 0.0.0.0:{server.server.grpc_port}" in message and f"ops 0.0.0.0:{server.server.ops_port}" in message
    assert "tokens file" in message and "127.0.0.1" in message  # says how to fix it


def test_teacher_with_auth_or_on_loopback_does_not_warn(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    authed = start_teacher(
        tiny_model_dir,
        "hf",
        grpc={"host": "0.0.0.0"},
        ops={"host": "0.0.0.0"},
        auth={"tokens_file": _tokens_file(tmp_path, alice=TOKEN)},
    )
    authed.stop()
    loopback = start_teacher(tiny_model_dir, "hf")  # 127.0.0.1 (the fixture's default)
    loopback.stop()
    assert _open_warnings(caplog) == []


@pytest.mark.parametrize(
    "host,with_auth,warns",
    [("0.0.0.0", False, True), ("::", False, True), ("0.0.0.0", True, False), ("127.0.0.1", False, False)],
)
def test_ops_port_warning(host, with_auth, warns, tmp_path, caplog):
    from prometheus_client import CollectorRegistry

    caplog.set_level(logging.WARNING)
    auth = BearerAuth(TokenTable(_tokens_file(tmp_path, viewer=TOKEN))) if with_auth else None
    io = LoopThread()
    server = OpsServer(create_ops_app("rollout", CollectorRegistry(), lambda: True, auth=auth), host, 0)
    try:
        try:
            io.call(server.start())
        except OSError as exc:
            if host == "::":
                pytest.skip(f"no IPv6 here: {exc}")
            raise
        records = _open_warnings(caplog)
        assert len(records) == (1 if warns else 0)
        if warns:
            assert records[0].getMessage().startswith("rollout listens on all interfaces")
    finally:
        io.call(server.stop())
        io.stop()
