"""Pod security, secrets and Redis hardening of the Kubernetes trees and the compose files.

The Pod Security Standard and secret rules live in tests/deploy/pod_security.py; each has a test that feeds it a
broken variant of a real manifest, so a rule that never fires would be noticed. The Redis start script is run for
real against a private redis-server: the password must not be on its command line nor in its environment, and a
write past maxmemory must fail with Redis' OOM error (the backpressure producers see) instead of evicting.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import secrets
import shutil
import subprocess
import time

import pytest
import redis

from opd.processes import free_port, stop_process
from opd.redis_server import find_redis_server
from tests.deploy import compose_project as cp
from tests.deploy import kube, pod_security
from tests.deploy.commands import REPO
from tests.deploy.test_kustomize import TREE_IDS, objects

pytestmark = [pytest.mark.timeout(300)]
needs_kubectl = pytest.mark.skipif(kube.kubectl() is None, reason="kubectl (with kustomize) is not on PATH")

REDIS_CONF = REPO / "deploy" / "redis" / "redis.conf"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
MAX_MEMORY_SHARE = 0.75  # maxmemory / memory limit: room for the AOF rewrite's fork, buffers and fragmentation
_UNITS = {
    "": 1,
    "k": 1000,
    "kb": 1024,
    "m": 1000**2,
    "mb": 1024**2,
    "g": 1000**3,
    "gb": 1024**3,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}


def _bytes(quantity: str, docker: bool = False) -> int:
    """`4Gi` (Kubernetes), `2560mb` (Redis) or `4g` (Docker: binary units) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity).strip()).groups()
    unit = unit.lower()
    if docker and unit in ("k", "m", "g"):
        unit += "i"
    return int(number) * _UNITS[unit]


def redis_conf(text: str | None = None) -> dict[str, str]:
    """Directives of redis.conf (the last occurrence wins, as in Redis)."""
    out = {}
    for line in (REDIS_CONF.read_text() if text is None else text).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key.lower()] = value.strip()
    return out


def _home() -> str:
    return re.search(r"\bHOME=(\S+)", DOCKERFILE.read_text())[1]


# ---------------------------------------------------------------------------------------------- pod security


@needs_kubectl
def test_the_restricted_check_rejects_what_admission_rejects():
    (template,) = [t for t in kube.pod_templates(objects("gpu-overlay")) if t.where == "Deployment/opd-teacher"]
    assert pod_security.restricted_violations(template.spec) == []
    cases = [
        ("spec", lambda s: s["securityContext"].pop("seccompProfile")),
        ("spec", lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation")),
        ("spec", lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"])),
        ("spec", lambda s: s["containers"][0]["securityContext"].update(capabilities={})),
        ("spec", lambda s: s["securityContext"].pop("runAsNonRoot")),
        ("spec", lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
        ("spec", lambda s: s.update(hostNetwork=True)),
        ("spec", lambda s: s["containers"][0]["ports"].append({"containerPort": 1, "hostPort": 1})),
    ]
    for _, mutate in cases:
        spec = copy.deepcopy(template.spec)
        mutate(spec)
        assert pod_security.restricted_violations(spec), f"{mutate} went unnoticed"


@needs_kubectl
@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_every_pod_passes_the_restricted_pod_security_standard(tree_id):
    for template in kube.pod_templates(objects(tree_id)):
        assert pod_security.restricted_violations(template.spec) == [], template.where


@needs_kubectl
@pytest.mark.parametrize("tree_id", [t for t in TREE_IDS if t != "base"])
def test_namespace_enforces_restricted_where_every_pod_is_ours(tree_id):
    """Enforced where the tree's manifests are every pod; overlays/ray enforces baseline (KubeRay adds containers
    the manifests do not show) and warns and audits restricted."""
    (namespace,) = kube.find(objects(tree_id), "Namespace")
    labels = namespace["metadata"]["labels"]
    operator_pods = bool(kube.find(objects(tree_id), "RayCluster"))
    assert labels["pod-security.kubernetes.io/enforce"] == ("baseline" if operator_pods else "restricted")
    assert labels["pod-security.kubernetes.io/warn"] == labels["pod-security.kubernetes.io/audit"] == "restricted"


@needs_kubectl
@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_every_container_has_a_read_only_root_filesystem(tree_id):
    for template in kube.pod_templates(objects(tree_id)):
        for container in template.containers(init=True):
            ctx = container.get("securityContext", {})
            assert ctx.get("readOnlyRootFilesystem") is True, f"{template.where}/{container['name']}"


def _writable_paths(template: kube.PodTemplate, container) -> list[str]:
    """Where the container's process writes (beyond its data volumes, checked in test_kustomize)."""
    image = container["image"].split(":")[0]
    if image.endswith("opd"):
        env = kube.container_env(container)
        home = env.get("HOME", _home())
        xdg = env.get("XDG_CACHE_HOME", f"{home}/.cache")
        paths = [
            "/tmp",
            home,
            xdg,
            env.get("HF_HOME", f"{xdg}/huggingface"),
            env.get("TRITON_CACHE_DIR", f"{home}/.triton/cache"),
            f"{xdg}/vllm",
            env.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_opd"),
        ]  # /dev/shm is its own tmpfs
        if template.owner["kind"] == "RayCluster":
            paths.append("/tmp/ray")  # Ray's session directory: logs, spilled objects
        return paths
    known = {
        "redis": ["/data", "/run/redis"],
        "oliver006/redis_exporter": [],
        "prom/prometheus": ["/prometheus"],
        "grafana/grafana": ["/var/lib/grafana", "/tmp"],
    }
    assert image in known, f"{template.where}: unknown image {image}: list where it writes"
    return known[image]


@needs_kubectl
@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_writable_paths_are_on_writable_volumes(tree_id):
    for template in kube.pod_templates(objects(tree_id)):
        for container in template.containers():
            for path in _writable_paths(template, container):
                found = kube.mount_for(template, container, path)
                where = f"{template.where}/{container['name']}: {path}"
                assert found, f"{where} is on the read-only root filesystem"
                volume, mount = found
                assert not mount.get("readOnly") and ("emptyDir" in volume or "persistentVolumeClaim" in volume), where
                if "emptyDir" in volume:
                    assert volume["emptyDir"].get("sizeLimit"), f"{where}: bound the emptyDir (sizeLimit)"


@needs_kubectl
@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_pods_with_persistent_volumes_skip_the_recursive_chown(tree_id):
    for template in kube.pod_templates(objects(tree_id)):
        if any("persistentVolumeClaim" in v for v in template.volumes()):
            ctx = template.spec["securityContext"]
            assert ctx.get("fsGroupChangePolicy") == "OnRootMismatch", f"{template.where}: chowns every volume on start"


# ---------------------------------------------------------------------------------------------- secrets


@needs_kubectl
def test_the_secret_check_finds_literals_and_secrets_on_command_lines():
    (template,) = [t for t in kube.pod_templates(objects("gpu-overlay")) if t.where.startswith("JobSet/")]
    assert pod_security.secret_leaks(template) == []
    variants = {
        "literal token": lambda c: c["env"].append({"name": "OPD_TRAIN__TEACHER__TOKEN", "value": "3f9a1c77e0"}),
        "literal URL password": lambda c: c["env"].append(
            {"name": "OPD_TRAIN__REDIS__URL", "value": "redis://:hunter2@opd-redis:6379/0"}
        ),
        "secret in args": lambda c: c["args"].append("--teacher-token=$(REDIS_PASSWORD)"),
        "secret flag": lambda c: c["args"].extend(["--teacher-token", "abc123"]),
        "token pairs with a literal": lambda c: c["env"].append(
            {"name": "X_TOKENS", "value": "a:$(REDIS_PASSWORD),b:0f3e9d1c2b"}
        ),
    }
    for name, mutate in variants.items():
        broken = copy.deepcopy(template)
        broken.template = copy.deepcopy(template.template)
        mutate(broken.spec["containers"][0])
        assert pod_security.secret_leaks(broken), f"{name} went unnoticed"


@needs_kubectl
@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_no_secret_is_a_literal_or_on_a_command_line(tree_id):
    for template in kube.pod_templates(objects(tree_id)):
        assert pod_security.secret_leaks(template) == []


_SECRET_VALUE = re.compile(r"(?i)token|password|secret")


def _compose_leaks(service_name: str, service: dict) -> list[str]:
    """In the uninterpolated file: no secret in env, on a command line or in a health check; secrets are files
    (`secrets:`), and an env variable that names a secret holds the path of a mounted one (`*_FILE`)."""
    problems = []
    mounted = cp.secret_mounts(service)
    for key in ("command", "entrypoint"):
        for part in cp.as_list(service.get(key)) if isinstance(service.get(key), list) else [service.get(key) or ""]:
            if "${" in part and _SECRET_VALUE.search(part) or pod_security._SECRET_FLAG.match(part):
                problems.append(f"{service_name}.{key}: {part!r} puts a secret on the command line")
    for part in (service.get("healthcheck") or {}).get("test", []):
        if "${" in part and _SECRET_VALUE.search(part):
            problems.append(f"{service_name}.healthcheck: {part!r} puts a secret on the command line")
    for name, value in cp.environment(service).items():
        for match in pod_security._URL_PASSWORD.finditer(value):
            if match[1]:
                problems.append(f"{service_name}: env {name}: a password in a URL ({match[1]!r}); use a *_FILE")
        if "${" in value and _SECRET_VALUE.search(value):
            problems.append(f"{service_name}: env {name} interpolates a secret: {value!r}")
        if (
            pod_security.SECRET_NAME.search(name)
            and not name.endswith("_ENV")
            and (not name.endswith("_FILE") or value not in mounted)
        ):
            problems.append(f"{service_name}: env {name} is not the path of a mounted secret: {value!r}")
    return problems


def test_the_compose_secret_check_finds_literals_and_command_lines():
    raw = cp.load_raw(cp.BASE_FILE)["services"]
    assert _compose_leaks("opd-trainer-cpu", raw["opd-trainer-cpu"]) == []
    broken = copy.deepcopy(raw["opd-trainer-cpu"])
    broken["environment"]["OPD_TRAIN__TEACHER__TOKEN"] = "0f3e9d1c2b"
    broken["environment"]["OPD_TRAIN__REDIS__URL"] = "redis://:hunter2@opd-redis:6379/0"
    broken["environment"]["OPD_TRAIN__REDIS__PASSWORD_FILE"] = "/not/mounted"
    broken["command"] = ["train", "--redis-url", "redis://:${OPD_REDIS_PASSWORD}@opd-redis:6379/0"]
    assert len(_compose_leaks("broken", broken)) == 4, _compose_leaks("broken", broken)


def test_compose_secrets_are_mounted_files_never_env_or_command_lines():
    assert "OPD_REDIS_PASSWORD" not in cp.read_env_file(), ".env holds no secret: make-secrets.sh writes files"
    for path in (cp.BASE_FILE, cp.TWO_STUDENTS_FILE, cp.COMPOSE_DIR / "docker-compose.two-teachers.yml"):
        for name, service in cp.load_raw(path)["services"].items():
            assert _compose_leaks(name, service) == [], path.name


# ---------------------------------------------------------------------------------------------- Redis


REDIS_PASSWORD_FILE = "/etc/opd/secrets/redis/password"  # the Secret's file, in compose and on Kubernetes


def _start_script(command: list[str]) -> str:
    assert command[:2] == ["sh", "-c"] and len(command) == 3, f"expected sh -c SCRIPT, got {command}"
    return command[2]


@needs_kubectl
@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_kubernetes_redis_runs_from_its_config_with_maxmemory_below_the_limit(tree_id):
    statefulset = kube.one(objects(tree_id), "StatefulSet", "opd-redis")
    (template,) = [t for t in kube.pod_templates(objects(tree_id)) if t.owner is statefulset]
    container, exporter = template.containers()  # redis, and the redis_exporter sidecar
    assert exporter["name"] == "exporter" and kube.container_port(exporter, "metrics") == 9121
    assert kube.mount_for(template, exporter, REDIS_PASSWORD_FILE)[0]["secret"]["secretName"] == "opd-redis"
    script = _start_script(container["command"])
    assert "args" not in container
    config_path = re.search(r"exec redis-server (\S+)$", script)[1]
    found = kube.mount_for(template, container, config_path)
    assert found and found[0]["configMap"]["name"].startswith("opd-redis-config"), "redis.conf from the ConfigMap"
    conf = redis_conf()
    auth_dir = os.path.dirname(conf["include"])
    volume, _ = kube.mount_for(template, container, auth_dir)
    assert volume.get("emptyDir", {}).get("medium") == "Memory", "the password file never touches a disk"
    assert f"> {conf['include']}" in script
    limit = _bytes(container["resources"]["limits"]["memory"])
    assert _bytes(conf["maxmemory"]) <= MAX_MEMORY_SHARE * limit, (
        f"maxmemory {conf['maxmemory']} leaves too little of the {container['resources']['limits']['memory']} limit"
    )
    assert _bytes(container["resources"]["requests"]["memory"]) >= _bytes(conf["maxmemory"])
    assert conf["maxmemory-policy"] == "noeviction" and conf["appendonly"] == "yes"
    assert kube.mount_for(template, container, conf["dir"])[0]["name"] == "data", "the AOF is on the PVC"


def test_compose_redis_runs_the_same_script_and_config_within_its_memory_limit():
    redis_service = cp.project(cp.BASE_FILE)["services"]["opd-redis"]
    script = _start_script(redis_service["entrypoint"])
    config_path = re.search(r"exec redis-server (\S+)$", script)[1]
    mounts = {target: source for source, target, _ in cp.volume_mounts(redis_service)}
    assert (cp.COMPOSE_DIR / mounts[config_path]).resolve() == REDIS_CONF
    assert os.path.dirname(redis_conf()["include"]) in cp.as_list(redis_service["tmpfs"])
    assert _bytes(redis_conf()["maxmemory"]) <= MAX_MEMORY_SHARE * _bytes(redis_service["mem_limit"], docker=True)
    assert "command" not in redis_service
    if kube.kubectl():
        k8s = kube.one(objects("base"), "StatefulSet", "opd-redis")["spec"]["template"]["spec"]["containers"][0]
        assert script == _start_script(k8s["command"]), "compose and Kubernetes start Redis the same way"


def test_redis_start_script_keeps_the_password_off_the_command_line_and_pushes_back(tmp_path):
    """The real script and redis.conf against a private redis-server (paths and port moved into tmp_path)."""
    start_script = _start_script(cp.project(cp.BASE_FILE)["services"]["opd-redis"]["entrypoint"])
    conf = redis_conf()
    port, password = free_port(), secrets.token_hex(24)
    (tmp_path / "data").mkdir()
    (tmp_path / "run").mkdir()
    conf_text = REDIS_CONF.read_text()
    replacements = {
        f"dir {conf['dir']}": f"dir {tmp_path / 'data'}",
        f"port {conf['port']}": f"port {port}",
        f"include {conf['include']}": f"bind 127.0.0.1\ninclude {tmp_path / 'run' / 'auth.conf'}",
    }
    for old, new in replacements.items():
        assert conf_text.count(old) == 1, old
        conf_text = conf_text.replace(old, new)
    (tmp_path / "redis.conf").write_text(conf_text)
    config_path = re.search(r"exec redis-server (\S+)$", start_script)[1]
    script = (
        start_script.replace(config_path, str(tmp_path / "redis.conf"))
        .replace(conf["include"], str(tmp_path / "run" / "auth.conf"))
        .replace("exec redis-server", f"exec {find_redis_server()}")
        .replace(REDIS_PASSWORD_FILE, str(tmp_path / "password"))
    )
    (tmp_path / "password").write_text(password + "\n")  # as `kubectl create secret --from-file` keeps it
    env = {"PATH": os.environ["PATH"]}
    proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = redis.Redis(port=port, password=password, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            assert proc.poll() is None, f"redis-server exited: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=5).ping()
        cmdline = (f"/proc/{proc.pid}/cmdline", f"/proc/{proc.pid}/environ")
        for path in cmdline:
            with open(path, "rb") as f:
                assert password.encode() not in f.read(), f"the password is in {path}"
        assert os.stat(tmp_path / "run" / "auth.conf").st_mode & 0o077 == 0, "auth.conf is readable by others"
        assert client.config_get("maxmemory")["maxmemory"] == str(_bytes(conf["maxmemory"]))
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        redis_cli = shutil.which("redis-cli")
        if redis_cli:  # the readiness probe's command, pointed at this port
            probe = _probe_command().replace("redis-cli", f"{redis_cli} -p {port}")
            right = probe.replace(REDIS_PASSWORD_FILE, str(tmp_path / "password"))
            assert subprocess.run(["sh", "-c", right], env=env, timeout=30).returncode == 0
            (tmp_path / "wrong").write_text("wrong")
            wrong = probe.replace(REDIS_PASSWORD_FILE, str(tmp_path / "wrong"))
            assert subprocess.run(["sh", "-c", wrong], env=env, timeout=30).returncode != 0
        client.xadd("opd-test:stream", {"payload": b"x" * 1024})
        client.config_set("maxmemory", "1mb")  # below what the server already uses
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.xadd("opd-test:stream", {"payload": b"x" * 1024})
        assert client.xlen("opd-test:stream") == 1, "noeviction: nothing was evicted to make room"
    finally:
        stop_process(proc, 10)


def _probe_command() -> str:
    """The Redis health check's shell command (compose); the Kubernetes probes run the same one."""
    test = cp.project(cp.BASE_FILE)["services"]["opd-redis"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    if kube.kubectl():
        k8s = kube.one(objects("base"), "StatefulSet", "opd-redis")["spec"]["template"]["spec"]["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            assert _start_script(k8s[probe]["exec"]["command"]) == test[1], probe
    return test[1]
