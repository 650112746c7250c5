"""Running N rollout workers: local processes (`--workers N`) or Ray actors (`--ray [ADDRESS]`).

Owns placement and restarts only; every worker is the same `run_worker`
with its own index, consumer name (`{worker_id or host}-{index}`) and ops port
(base + index). A restarted worker keeps its consumer name, so it first
resumes the prompts it held when it died; prompts of a worker that never comes
back are claimed by the others once its heartbeat expires
(`queue.heartbeat_ttl_s`), or after `queue.claim_idle_s` for a worker without
one. The parent feeds
`--prompts` while the fleet runs. Ray restarts a dead actor itself
(`max_restarts`), so the fleet grows across nodes on Ray's scheduler rather
than a home-made one; Ray is imported only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import yaml

from opd.processes import stop_processes
from protos.records import PromptRecord
from rollout_workers.config import RolloutConfig

log = logging.getLogger(__name__)


def worker_config(config: RolloutConfig, index: int) -> RolloutConfig:
    """The config of worker `index` of a fleet: one worker, no feeding (its name and ops port follow the index)."""
    return config.model_copy(
        update={"workers": 1, "ray": None, "prompts": None, "feed_only": False, "worker_index": index}
    )


class _Feeder(threading.Thread):
    """Feeds the prompt file from the parent while the fleet runs (its own event loop)."""

    def __init__(self, config: RolloutConfig, records: list[PromptRecord] | None) -> None:
        super().__init__(name="prompt-feeder", daemon=True)
        self.config, self.records = config, records
        self.error: BaseException | None = None

    def run(self) -> None:
        if not self.records:
            return
        from opd.streams import connect
        from rollout_workers.worker import feed_from_config

        async def feed() -> None:
            redis = connect(self.config.redis)
            try:
                await feed_from_config(self.config, redis, self.records)
            finally:
                await redis.aclose()

        try:
            asyncio.run(feed())
        except BaseException as exc:  # noqa: BLE001 - reported by the supervisor
            self.error = exc
            log.error("prompt feeder failed: %s", exc)


# ---------------------------------------------------------------------------------------------- local processes


def _spawn(config_path: str, index: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "rollout_workers", "--config", config_path, "--worker-index", str(index)]
    )


def run_local_fleet(config: RolloutConfig, records: list[PromptRecord] | None = None) -> int:
    """Run `config.workers` worker processes until all exit; restart a crashed one up to `max_restarts` times."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="opd-rollout-", delete=False) as f:
        os.chmod(f.name, 0o600)  # the Redis URL may hold a password
        yaml.safe_dump(worker_config(config, 0).model_dump(mode="json", exclude={"worker_index"}), f)
    feeder = _Feeder(config, records)
    feeder.start()
    procs = {i: _spawn(f.name, i) for i in range(config.workers)}
    restarts, codes = dict.fromkeys(procs, 0), {}
    try:
        while len(codes) < len(procs):
            if stopping.is_set():
                _terminate(procs, config.drain_grace_s)
            for i, proc in procs.items():
                code = proc.poll()
                if code is None or i in codes:
                    continue
                if code != 0 and not stopping.is_set() and restarts[i] < config.max_restarts:
                    restarts[i] += 1
                    log.warning("worker %d exited with %d; restart %d of %d", i, code, restarts[i], config.max_restarts)
                    procs[i] = _spawn(f.name, i)
                else:
                    codes[i] = code
            time.sleep(0.2)
    finally:
        _terminate(procs, config.drain_grace_s)
        os.unlink(f.name)
    return 0 if all(c == 0 for c in codes.values()) and feeder.error is None else 1


def _terminate(procs: dict[int, subprocess.Popen[bytes]], grace_s: float) -> None:
    stop_processes(procs.values(), grace_s + 5)


# ---------------------------------------------------------------------------------------------- Ray actors


class RolloutActor:
    """A worker inside a Ray actor: the worker loop runs in a thread with its own event loop from __init__,
    so an actor Ray restarts resumes work without a call from the driver. A worker that fails exits the
    process, which makes Ray restart it."""

    def __init__(self, config_json: dict[str, Any], index: int) -> None:
        from opd.logs import setup_logging

        self.config = worker_config(RolloutConfig.model_validate(config_json), index)
        setup_logging(self.config.log_level)
        self.state, self.groups_done = "starting", 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        threading.Thread(target=self._main, name="rollout-worker", daemon=True).start()

    def _main(self) -> None:
        from rollout_workers.worker import run_worker

        async def go() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self.state = "running"
            worker = await run_worker(self.config, stop=self._stop)
            self.groups_done = worker.groups_done

        try:
            asyncio.run(go())
            self.state = "done"
        except BaseException:  # any failure, even SystemExit: exit so that Ray restarts the actor
            log.exception("worker %d failed; exiting so that Ray restarts it", self.config.worker_index)
            os._exit(1)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": os.getpid(),
            "groups_done": self.groups_done,
            "worker": self.config.consumer_name(),
        }

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)


class RayFleet:
    """`config.workers` RolloutActors on a Ray cluster (`config.ray`: `local` or an address)."""

    def __init__(self, config: RolloutConfig, lost_after_s: float = 300.0) -> None:
        self.config, self.lost_after_s = config, lost_after_s
        self.actors: list[Any] = []

    def start(self) -> RayFleet:
        import ray

        if not ray.is_initialized():
            address = None if self.config.ray == "local" else self.config.ray
            ray.init(
                address=address,
                include_dashboard=False,
                ignore_reinit_error=True,
                log_to_driver=True,
                logging_level=logging.WARNING,
            )
        actor_cls = ray.remote(RolloutActor).options(
            num_cpus=self.config.ray_num_cpus, num_gpus=self.config.ray_num_gpus, max_restarts=self.config.max_restarts
        )
        config_json = self.config.model_dump(mode="json")
        self.actors = [actor_cls.remote(config_json, i) for i in range(self.config.workers)]
        log.info("started %d rollout actors on Ray (%s)", len(self.actors), self.config.ray)
        return self

    def statuses(self, timeout_s: float = 30.0) -> list[dict[str, Any] | None]:
        """Each actor's status; None for an actor that is restarting or gone."""
        import ray
        import ray.exceptions

        out: list[dict[str, Any] | None] = []
        for actor in self.actors:
            try:
                out.append(ray.get(actor.status.remote(), timeout=timeout_s))
            except (ray.exceptions.RayError, TimeoutError):
                out.append(None)
        return out

    def wait(self, poll_s: float = 1.0) -> int:
        """Until every actor is done (0), or one stayed unreachable for `lost_after_s` (1)."""
        unreachable_since: dict[int, float] = {}
        while True:
            statuses = self.statuses()
            now = time.monotonic()
            for i, status in enumerate(statuses):
                if status is None:
                    first = unreachable_since.setdefault(i, now)
                    if now - first > self.lost_after_s:
                        log.error("rollout actor %d unreachable for %.0f s: giving up", i, now - first)
                        return 1
                else:
                    unreachable_since.pop(i, None)
            if all(s is not None and s["state"] == "done" for s in statuses):
                return 0
            time.sleep(poll_s)

    def stop(self) -> None:
        """Ask every actor to drain (up to `drain_grace_s`), then kill them without restart."""
        import ray
        import ray.exceptions

        for actor in self.actors:
            with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
                ray.get(actor.stop.remote(), timeout=10)
        deadline = time.monotonic() + self.config.drain_grace_s
        while time.monotonic() < deadline and any(
            s is not None and s["state"] == "running" for s in self.statuses(timeout_s=5)
        ):
            time.sleep(0.2)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def run_ray_fleet(config: RolloutConfig, records: list[PromptRecord] | None = None) -> int:
    """Run the fleet as Ray actors until every worker is done (with --exit-when-drained) or SIGTERM."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    feeder = _Feeder(config, records)
    feeder.start()
    fleet = RayFleet(config).start()
    waiter = threading.Thread(target=lambda: setattr(waiter, "code", fleet.wait()), daemon=True)
    waiter.start()
    while waiter.is_alive() and not stopping.is_set():
        waiter.join(0.5)
    fleet.stop()
    return getattr(waiter, "code", 0) if feeder.error is None else 1
