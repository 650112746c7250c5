"""docker-compose files: the Compose specification schema, real opd command lines, and the wiring between services.

Without a Docker engine: the files are interpolated with deploy/compose/.env.example, validated against the
Compose Specification JSON schema (tests/deploy/schemas), and every opd service's command is parsed by the
component's own config loader. The wiring checks follow what each process would do with its parsed config:
connect to the teacher and Redis at the addresses it was given, listen on its ops port, read and write the paths
it was given.
"""

from __future__ import annotations

import copy
import functools
import json
import re

import jsonschema
import pytest

from opd.prompts import load_prompts
from teacher_server.auth import load_tokens
from tests.deploy import compose_project as cp
from tests.deploy.commands import REPO, host_path, parse_container, redis_endpoint, split_host_port

pytestmark = pytest.mark.timeout(120)

SCHEMA_PATH = REPO / "tests" / "deploy" / "schemas" / "compose-spec.json"
PROFILES = ("cpu", "gpu")
PROFILE_IDS = [f"{p}-profile" for p in PROFILES]  # not plain "gpu": that id would mark a test as needing CUDA
_GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
IMAGE_DIRS = ("/etc/opd/presets", "/opt/opd/data")  # baked into the image (deploy/docker/Dockerfile)


def _validator() -> jsonschema.Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    checker = jsonschema.FormatChecker()
    checker.checks("duration")(lambda value: not isinstance(value, str) or bool(_GO_DURATION.match(value)))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=checker)


def _errors(model: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(model)]


@functools.cache
def merged() -> dict:
    return cp.project(cp.BASE_FILE, cp.TWO_STUDENTS_FILE)


@functools.cache
def base() -> dict:
    return cp.project(cp.BASE_FILE)


def _opd_services(model: dict) -> dict[str, dict]:
    return {n: s for n, s in model["services"].items() if str(s.get("image", "")).startswith("opd:")}


@functools.cache
def parsed(model_name: str, service: str):
    model = merged() if model_name == "merged" else base()
    svc = model["services"][service]
    entrypoint = cp.as_list(svc.get("entrypoint")) or ["opd"]
    return parse_container(entrypoint, cp.as_list(svc.get("command")), cp.environment(svc))


def _by_component(model_name: str, profile: str, component: str) -> dict[str, object]:
    model = merged() if model_name == "merged" else base()
    out = {}
    for name in cp.services_in_profile(model, profile):
        if name in _opd_services(model) and parsed(model_name, name).component == component:
            out[name] = parsed(model_name, name)
    return out


# ---------------------------------------------------------------------------------------------- files and schema


def test_env_example_provides_every_variable_the_files_require():
    required = set()
    for path in (cp.BASE_FILE, cp.TWO_STUDENTS_FILE):
        required |= set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", path.read_text()))
    env = cp.read_env_file()
    assert required <= set(env), f"set in .env.example: {sorted(required - set(env))}"


def test_make_secrets_writes_every_secret_file_the_compose_files_mount(compose_secrets):
    model = merged()
    used = {name for svc in model["services"].values() for name in cp.secret_mounts(svc).values()}
    assert used == set(model["secrets"]), "declare exactly the secrets the services mount"
    for name, secret in model["secrets"].items():
        assert secret["file"].startswith("./secrets/"), f"{name}: secret files live in deploy/compose/secrets"
        assert (compose_secrets / secret["file"]).read_text().strip(), f"make-secrets.sh did not write {name}"
    assert "deploy/compose/secrets/" in (REPO / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize(
    "files",
    [
        ("docker-compose.yml",),
        ("docker-compose.two-students.yml",),
        ("docker-compose.yml", "docker-compose.two-students.yml"),
    ],
    ids=["base", "two-students-alone", "base+two-students"],
)
def test_compose_files_validate_against_the_compose_spec(files):
    model = cp.project(*(cp.COMPOSE_DIR / f for f in files))
    assert _errors(model) == []


def test_the_schema_check_rejects_what_compose_rejects():
    model = copy.deepcopy(base())
    model["services"]["opd-teacher-cpu"]["helthcheck"] = {}
    model["services"]["opd-redis"]["healthcheck"]["interval"] = "5 seconds"
    model["services"]["opd-trainer-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] = []
    errors = "\n".join(_errors(model))
    assert "helthcheck" in errors and "5 seconds" in errors and "count" in errors


def test_bind_mounts_and_build_context_exist():
    for name, svc in merged()["services"].items():
        for source, _, _ in cp.volume_mounts(svc):
            if source.startswith("../"):
                assert (cp.COMPOSE_DIR / source).exists(), f"{name}: bind mount {source} does not exist"
            elif not source.startswith(("./", "/")):
                assert source in merged()["volumes"], f"{name}: volume {source} is not declared"
        if "build" in svc:
            build = svc["build"]
            assert (cp.COMPOSE_DIR / build["context"] / build["dockerfile"]).is_file()
            tag = svc["image"].rsplit("-", 1)[-1]
            assert build["target"] == tag, f"{name}: image {svc['image']} built from target {build['target']}"


def test_depends_on_names_services_of_the_same_profiles():
    services = merged()["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on") or []:
            assert dep in services, f"{name} depends on unknown {dep}"
            assert set(svc.get("profiles", [])) <= set(services[dep].get("profiles", [])), (
                f"{name} (profiles {svc.get('profiles')}) depends on {dep} (profiles {services[dep].get('profiles')})"
            )


# ---------------------------------------------------------------------------------------------- commands


@pytest.mark.parametrize("service", sorted(_opd_services(merged())))
def test_opd_service_command_parses_into_its_component_config(service):
    result = parsed("merged", service)
    svc = merged()["services"][service]
    assert result.component in service, f"{service} runs `opd {result.component}`"
    if result.torchrun is not None:
        assert svc["entrypoint"] == ["torchrun"]
        assert int(result.torchrun.nnodes) == 1 and result.torchrun.standalone, "one node: torchrun --standalone"
    if result.config.model != "embedded" and not result.config.model.startswith("/var/cache/opd/"):
        assert cp.mount_for(svc, result.config.model), f"{service}: model {result.config.model} is not mounted"


def test_presets_and_prompt_files_named_in_commands_load():
    for name in _opd_services(merged()):
        result = parsed("merged", name)
        config = result.config
        if result.component == "train":
            for path in (config.data.prompts, config.data.eval_prompts):
                if path and path.startswith(IMAGE_DIRS):
                    assert load_prompts(str(host_path(path)), config.data.source), f"{name}: {path} is empty"


# ---------------------------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("profile", PROFILES, ids=PROFILE_IDS)
def test_profile_runs_the_whole_pipeline(profile):
    services = cp.services_in_profile(merged(), profile)
    assert {"opd-redis", "opd-prometheus", "opd-grafana"} <= set(services)
    assert len(_by_component("base", profile, "teacher")) == 1
    assert _by_component("base", profile, "rollout") and _by_component("base", profile, "train")


@pytest.mark.parametrize("profile", PROFILES, ids=PROFILE_IDS)
def test_trainers_reach_a_teacher_that_knows_their_token(profile, compose_secrets):
    """Through the files make-secrets.sh writes: the trainer's token file names its student in the teacher's."""
    model = merged()
    services = model["services"]
    teachers = _by_component("merged", profile, "teacher")
    for name, trainer in _by_component("merged", profile, "train").items():
        for address in trainer.config.teacher.addresses:
            host, port = split_host_port(address)
            target = [t for t in teachers if host in cp.aliases(t, services[t])]
            assert target, f"{name}: no teacher service answers to {host!r}"
            teacher = teachers[target[0]].config
            assert port == teacher.grpc.port, f"{name}: teacher port {port}, teacher listens on {teacher.grpc.port}"
            tokens_file = cp.secret_source(model, services[target[0]], teacher.auth.tokens_file)
            assert tokens_file, f"{target[0]}: auth is off or its tokens file is not a mounted secret"
            tokens = load_tokens(teacher.auth.model_copy(update={"tokens_file": str(compose_secrets / tokens_file)}))
            token_file = cp.secret_source(model, services[name], trainer.config.teacher.token_file)
            assert token_file and trainer.config.teacher.token is None, f"{name}: its token is not a secret file"
            client = tokens.get((compose_secrets / token_file).read_text().strip())
            assert client == trainer.config.redis.namespace, (
                f"{name}: its token names client {client!r} at the teacher, expected its namespace "
                f"{trainer.config.redis.namespace!r}"
            )
            assert target[0] in (services[name].get("depends_on") or {})


@pytest.mark.parametrize("profile", PROFILES, ids=PROFILE_IDS)
def test_redis_clients_use_the_redis_service_and_its_password(profile):
    model = merged()
    services = model["services"]
    script = services["opd-redis"]["entrypoint"][-1]  # copies the file into auth.conf at start
    server_file = re.search(r"cat (\S+)\)", script)[1]
    password = cp.secret_source(model, services["opd-redis"], server_file)
    assert password, "opd-redis reads its password from a mounted secret"
    for component in ("rollout", "train"):
        for name, result in _by_component("merged", profile, component).items():
            host, port, url_password = redis_endpoint(result.config.redis.url)
            assert host in cp.aliases("opd-redis", services["opd-redis"]) and port == 6379, name
            assert url_password is None, f"{name}: no password in the Redis URL"
            assert cp.secret_source(model, services[name], result.config.redis.password_file) == password, name
            assert services[name]["depends_on"]["opd-redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("profile", PROFILES, ids=PROFILE_IDS)
def test_every_trainer_has_rollout_workers_on_its_namespace_that_see_its_weights(profile):
    services = merged()["services"]
    workers = _by_component("merged", profile, "rollout")
    for name, trainer in _by_component("merged", profile, "train").items():
        config = trainer.config
        mine = [w for w, r in workers.items() if r.config.redis.namespace == config.redis.namespace]
        assert mine, f"{name}: no rollout worker consumes namespace {config.redis.namespace!r}"
        publish = cp.mount_for(services[name], config.publish.uri)
        checkpoint = cp.mount_for(services[name], config.checkpoint.dir)
        assert publish and not publish[2], f"{name}: publish URI {config.publish.uri} is not on a writable volume"
        assert checkpoint and not checkpoint[2] and checkpoint[0] in merged()["volumes"], (
            f"{name}: checkpoints must outlive the container (a named volume)"
        )
        for worker in mine:
            seen = cp.mount_for(services[worker], config.publish.uri)
            assert seen and seen[:2] == publish[:2], f"{worker} does not mount {name}'s weights at {config.publish.uri}"
    namespaces = [t.config.redis.namespace for t in _by_component("merged", profile, "train").values()]
    assert len(namespaces) == len(set(namespaces)), "two trainers share a Redis namespace"


@pytest.mark.parametrize("profile", PROFILES, ids=PROFILE_IDS)
def test_students_converted_by_the_teacher_wait_for_it(profile):
    """A student under the model cache is the embedded model the teacher converts: same volume, started after."""
    services = merged()["services"]
    teachers = _by_component("merged", profile, "teacher")
    for component in ("rollout", "train"):
        for name, result in _by_component("merged", profile, component).items():
            if not result.config.model.startswith("/var/cache/opd/"):
                continue
            source = cp.mount_for(services[name], result.config.model)
            assert source, f"{name}: {result.config.model} is not mounted"
            (teacher,) = teachers
            assert teachers[teacher].config.model == "embedded"
            assert cp.mount_for(services[teacher], "/var/cache/opd")[:2] == (source[0], "/var/cache/opd")
            assert services[name]["depends_on"][teacher]["condition"] == "service_healthy"


def _ops_port(result) -> int:
    config = result.config
    return config.ops_port() if result.component == "rollout" else config.ops.port


@pytest.mark.parametrize("service", sorted(_opd_services(merged())))
def test_healthcheck_probes_the_port_the_component_listens_on(service):
    test = merged()["services"][service]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "opd-healthcheck"], test
    port = int(re.match(r"http://127\.0\.0\.1:(\d+)/", test[2])[1])
    assert port == _ops_port(parsed("merged", service))


def test_prometheus_finds_every_component_at_its_ops_port():
    import yaml

    services = merged()["services"]
    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    mounted = [s for s, t, _ in cp.volume_mounts(services["opd-prometheus"]) if t == "/etc/prometheus/prometheus.yml"]
    assert mounted and (cp.COMPOSE_DIR / mounted[0]).resolve() == REPO / "deploy" / "prometheus" / "prometheus.yml"
    targets = {}
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                targets[name] = sd["port"]
    for name in _opd_services(merged()):
        matching = [alias for alias in cp.aliases(name, services[name]) if alias in targets]
        assert len(matching) == 1, f"{name} is not found by exactly one Prometheus job (aliases {matching})"
        assert targets[matching[0]] == _ops_port(parsed("merged", name)), name


def test_gpu_profile_gives_each_component_its_own_gpu():
    gpus = {}
    for name, svc in cp.services_in_profile(base(), "gpu").items():
        for device in svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []):
            assert "gpu" in device["capabilities"]
            gpus[name] = set(device["device_ids"])
    assert {"opd-teacher-gpu", "opd-rollout-gpu", "opd-trainer-gpu"} <= set(gpus)
    assert not gpus["opd-teacher-gpu"] & gpus["opd-trainer-gpu"], "teacher and trainer share a GPU"
    assert not gpus["opd-teacher-gpu"] & gpus["opd-rollout-gpu"]
    trainer = parsed("base", "opd-trainer-gpu")
    assert int(trainer.torchrun.nproc_per_node) == len(gpus["opd-trainer-gpu"]), "one process per reserved GPU"


def test_trainers_stop_grace_sets_torchruns_timeout_and_the_stop_grace_period():
    """The trainer checkpoints within its stop grace on SIGTERM; torchrun waits that long, Compose a margin more."""
    margin_s = 15
    for name in _opd_services(merged()):
        result = parsed("merged", name)
        if result.component != "train":
            continue
        env = cp.environment(merged()["services"][name])
        stop_grace = (
            result.config.stop_grace_s
            if "stop_grace_s" in type(result.config).model_fields
            else float(env["OPD_TRAIN__STOP_GRACE_S"])
        )
        if result.torchrun is not None:
            assert int(result.torchrun.shutdown_timeout) == stop_grace, name
        period = merged()["services"][name]["stop_grace_period"]
        assert _GO_DURATION.match(period) and period.endswith("s") and float(period[:-1]) >= stop_grace + margin_s, name
