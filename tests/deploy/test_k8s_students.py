"""Several students beside one teacher: overlays/gpu (the teacher, Redis and student-a) rendered together with
deploy/k8s/students/student-b, the way an operator applies them into one namespace.

Checks, on the rendered objects: no object name collides; each trainer rendezvouses with its own rank 0 under its
own headless Service, reads its own presets ConfigMap, uses its own Redis namespace, client name, token key and
weight/checkpoint directories; each workload's selectors pick only its own pods; the NetworkPolicies, evaluated
(tests/deploy/netpol.py), let each student's pods reach the teacher and Redis but not the other student's pods;
the second student's custom resources validate against the vendored CRDs.
"""

from __future__ import annotations

import itertools
import os

import pytest
import yaml

from tests.deploy import crd_check, kube, netpol
from tests.deploy.commands import parse_container, split_host_port

pytestmark = pytest.mark.skipif(kube.kubectl() is None, reason="kubectl is not installed (it renders kustomize)")

STUDENT_B = kube.K8S / "students" / "student-b"
STUDENTS = ("student-a", "student-b")
TRAINER_PORTS = (29500, 9103, 12345)  # rendezvous, ops, one NCCL/Gloo port drawn at run time


def objects() -> tuple[dict, ...]:
    return (
        kube.render(kube.K8S / "overlays" / "gpu") + kube.render(STUDENT_B) + kube.render(kube.BUNDLES["gpu-overlay"])
    )


def _student(template: kube.PodTemplate) -> str | None:
    return (
        template.labels.get("app.kubernetes.io/instance")
        if template.labels.get("app.kubernetes.io/component")
        in (
            "trainer",
            "rollout",
        )
        else None
    )


def _processes(component: str) -> dict[str, tuple[kube.PodTemplate, dict, object]]:
    """Student name -> (pod template, container, parsed command line) of its `component` (train or rollout)."""
    out = {}
    for template in kube.pod_templates(objects()):
        for container in template.containers():
            if container["image"].split(":")[0].endswith("opd"):
                env = kube.container_env(container)
                command, args = kube.command_line(container, env)
                parsed = parse_container(command or ["opd"], args, env)
                if parsed.component == component:
                    assert _student(template) not in out, f"two {component} processes for {_student(template)}"
                    out[_student(template)] = (template, container, parsed)
    return out


def test_no_object_name_collides():
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects()]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert {o["metadata"].get("namespace") for o in objects() if o["kind"] not in ("Namespace", "PriorityClass")} == {
        "opd"
    }


def test_each_trainer_rendezvouses_with_its_own_rank_zero():
    rendered = objects()
    trainers = _processes("train")
    assert set(trainers) == set(STUDENTS)
    for student, (template, _, parsed) in trainers.items():
        jobset = template.owner
        host, _, subdomain = parsed.torchrun.master_addr.partition(".")
        assert host == template.hostname(index=0), f"{student} dials {host}, not its own rank 0"
        assert jobset["spec"]["network"]["subdomain"] == subdomain
        service = kube.one(rendered, "Service", subdomain)
        selected = [
            t.where for t in kube.pod_templates(rendered) if kube.selects(service["spec"]["selector"], t.labels)
        ]
        assert selected == [template.where], f"{subdomain} selects {selected}"
        presets = template.volume("presets")["configMap"]["name"]
        kube.one(rendered, "ConfigMap", presets)  # exists, under the student's prefixed name
        if student != "student-a":
            assert presets.startswith(f"{student}-") and jobset["metadata"]["name"].startswith(f"{student}-")
    hosts = {t[2].torchrun.master_addr for t in trainers.values()}
    assert len(hosts) == len(STUDENTS), hosts


def test_each_student_has_its_own_redis_namespace_name_token_and_directories():
    trainers, rollouts = _processes("train"), _processes("rollout")
    assert set(rollouts) == set(STUDENTS)
    for student in STUDENTS:
        template, container, parsed = trainers[student]
        config = parsed.config
        assert config.redis.namespace == config.teacher.client_name == student
        assert rollouts[student][2].config.redis.namespace == student, "its workers feed its own streams"
        assert kube.secret_file(template, container, config.teacher.token_file) == ("opd-student-tokens", student)
        assert config.publish.uri == f"/shared/weights/{student}"
        assert config.checkpoint.dir == f"/shared/checkpoints/{student}"
        assert template.labels["app.kubernetes.io/instance"] == student, "PodMonitor job = the student's name"


def test_workload_selectors_pick_only_their_own_pods():
    rendered = objects()
    templates = list(kube.pod_templates(rendered))
    for owner in [o for o in rendered if o["kind"] in ("Deployment", "StatefulSet")]:
        selector = owner["spec"]["selector"]
        picked = [t.where for t in templates if kube.selects(selector, t.pod_labels())]
        assert picked == [f"{owner['kind']}/{owner['metadata']['name']}"], picked


def _pods() -> dict[str, list[netpol.Pod]]:
    out: dict[str, list[netpol.Pod]] = {}
    for pod in netpol.pods(objects()):
        component = pod.labels.get("app.kubernetes.io/component")
        key = pod.labels.get("app.kubernetes.io/instance") if component in ("trainer", "rollout") else component
        out.setdefault(key, []).append(pod)
    return out


def test_each_students_pods_reach_the_teacher_and_redis_but_not_the_other_student():
    rendered, pods = objects(), _pods()
    (teacher,) = pods["teacher"]
    (redis,) = pods["redis"]
    for student in STUDENTS:
        trainer = [p for p in pods[student] if p.labels["app.kubernetes.io/component"] == "trainer"]
        assert trainer and all(netpol.allowed(rendered, p, teacher, 50051) for p in trainer), student
        assert all(netpol.allowed(rendered, p, redis, 6379) for p in pods[student]), student
        for p in trainer:  # its own group: rendezvous and collectives
            assert netpol.allowed(rendered, p, p, 29500)
    for a, b in itertools.permutations(STUDENTS):
        for client, server in itertools.product(pods[a], pods[b]):
            for port in (*TRAINER_PORTS, 9102):
                assert not netpol.allowed(rendered, client, server, port), f"{client.where} -> {server.where}:{port}"


def test_the_second_students_custom_resources_validate():
    custom = [o for o in kube.render(STUDENT_B) if o["kind"] in crd_check.kinds()]
    assert [o["kind"] for o in custom] == ["JobSet"]
    assert [p for o in custom for p in crd_check.problems(o)] == []


def test_the_teacher_address_is_the_shared_headless_service():
    rendered = objects()
    for _, _, parsed in _processes("train").values():
        (address,) = parsed.config.teacher.addresses
        host, _ = split_host_port(address)
        kube.one(rendered, "Service", host)


def _with_mtls(tmp_path, tree) -> tuple[dict, ...]:
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(tree, tmp_path)],
                "components": [os.path.relpath(kube.K8S / "components" / "mtls", tmp_path)],
            }
        )
    )
    return kube.render_uncached(tmp_path)


def test_mutual_tls_component_gives_each_student_its_own_client_certificate(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rendered = _with_mtls(tmp_path / "a", kube.K8S / "overlays" / "gpu") + _with_mtls(tmp_path / "b", STUDENT_B)
    seen = set()
    for template in kube.pod_templates(rendered):
        for container in template.containers():
            if not container["image"].split(":")[0].endswith("opd"):
                continue
            env = kube.container_env(container)
            command, args = kube.command_line(container, env)
            parsed = parse_container(command or ["opd"], args, env)
            if parsed.component == "teacher":
                ca = parsed.config.grpc.tls_client_ca_file
                assert kube.secret_file(template, container, ca) == ("opd-teacher-tls", "ca.crt")
                seen.add("teacher")
            elif parsed.component == "train":
                student, teacher = template.labels["app.kubernetes.io/instance"], parsed.config.teacher
                for path, suffix in ((teacher.tls_cert_file, "crt"), (teacher.tls_key_file, "key")):
                    assert kube.secret_file(template, container, path) == ("opd-student-certs", f"{student}.{suffix}")
                seen.add(student)
    assert seen == {"teacher", *STUDENTS}
    assert [p for o in rendered if o["kind"] == "JobSet" for p in crd_check.problems(o)] == []
