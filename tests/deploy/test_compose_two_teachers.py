"""deploy/compose/docker-compose.two-teachers.yml over the base file, validated offline like the others: the
Compose schema, the real config loaders on every opd command, and the wiring of one trainer to two teachers."""

from __future__ import annotations

import functools

import pytest

from opd.prompts import load_prompts
from teacher_server.auth import load_tokens
from tests.deploy import compose_project as cp
from tests.deploy.commands import host_path, parse_container, split_host_port
from tests.deploy.test_compose import _errors

pytestmark = pytest.mark.timeout(120)
TWO_TEACHERS_FILE = cp.COMPOSE_DIR / "docker-compose.two-teachers.yml"


@functools.cache
def model() -> dict:
    return cp.project(cp.BASE_FILE, TWO_TEACHERS_FILE)


def _parsed(service: str):
    svc = model()["services"][service]
    return parse_container(cp.as_list(svc.get("entrypoint")) or ["opd"], cp.as_list(svc.get("command")),
                           cp.environment(svc))  # fmt: skip


def test_the_file_validates_and_needs_no_variable_the_env_example_lacks():
    assert _errors(model()) == []
    assert set(cp.project(TWO_TEACHERS_FILE)["services"]) == {"opd-teacher-code", "opd-trainer-cpu"}


def test_the_trainer_routes_each_domain_of_its_prompts_to_a_teacher_that_knows_its_token(compose_secrets):
    services = model()["services"]
    trainer = _parsed("opd-trainer-cpu").config
    teachers = {n: _parsed(n).config for n in cp.services_in_profile(model(), "cpu") if n.startswith("opd-teacher")}
    assert set(trainer.teachers) == {"math", "code"}
    reached = set()
    for domain, endpoint in {"default": trainer.teacher, **trainer.teachers}.items():
        for address in endpoint.addresses:
            host, port = split_host_port(address)
            (name,) = [t for t in teachers if host in cp.aliases(t, services[t])]
            assert port == teachers[name].grpc.port, (
                f"{domain}: port {port}, {name} listens on {teachers[name].grpc.port}"
            )
            auth = teachers[name].auth
            tokens_file = compose_secrets / cp.secret_source(model(), services[name], auth.tokens_file)
            token_file = compose_secrets / cp.secret_source(model(), services["opd-trainer-cpu"], endpoint.token_file)
            token = token_file.read_text().strip()
            assert load_tokens(auth.model_copy(update={"tokens_file": str(tokens_file)})).get(token) == (
                trainer.redis.namespace
            ), domain
            assert name in (services["opd-trainer-cpu"].get("depends_on") or {}), f"the trainer waits for {name}"
            reached.add(name)
    assert reached == {"opd-teacher-cpu", "opd-teacher-code"}  # two different teacher services
    records = load_prompts(str(host_path(trainer.data.prompts)), trainer.data.source)
    domains = {r.teacher for r in records}
    assert domains == set(trainer.teachers), f"the prompt file's domains {domains} are the configured teachers"
