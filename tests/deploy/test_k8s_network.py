"""NetworkPolicies of every kustomize tree: default deny for every opd pod, and exactly the connections opd needs.

Connections are decided by tests/deploy/netpol.py (the API's semantics: the client's egress and the server's
ingress must both allow them) between the rendered pods and a few pods from outside the tree: the cluster DNS,
a Prometheus in another namespace, an unrelated pod in the same namespace, and trainers of other teams. Ports come
from the parsed component configs where a config sets them.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest

from tests.deploy import kube, netpol
from tests.deploy.test_kustomize import TREE_IDS, objects, opd_processes, processes

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(kube.kubectl() is None, reason="kubectl (with kustomize) is not on PATH"),
]

KUBE_DNS = netpol.Pod("kube-system", {"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"})
PROMETHEUS = netpol.Pod(
    "monitoring",
    {"app.kubernetes.io/name": "prometheus"},
    {"kubernetes.io/metadata.name": "monitoring"},
    where="kube-prometheus-stack",
)
INTERNET = netpol.External("140.82.112.3")
API_SERVER = netpol.External("10.0.0.1")
COLLECTIVE_PORT = 43817  # a port NCCL/Gloo might pick at run time


def _namespace(tree_id: str) -> str:
    return kube.find(objects(tree_id), "Namespace")[0]["metadata"]["name"] if tree_id != "base" else "default"


def _pods(tree_id: str) -> list[netpol.Pod]:
    return netpol.pods(objects(tree_id))


def _by_component(tree_id: str, component: str) -> list[netpol.Pod]:
    return [p for p in _pods(tree_id) if p.labels.get("app.kubernetes.io/component") == component]


def _stranger(tree_id: str, **labels: str) -> netpol.Pod:
    """A pod of the same namespace that is not part of opd."""
    ns = _namespace(tree_id)
    return netpol.Pod(
        ns,
        labels or {"app.kubernetes.io/name": "something-else"},
        netpol.namespace_labels(objects(tree_id), ns),
        where="stranger",
    )


def _teacher(tree_id: str) -> tuple[netpol.Pod, int, int]:
    (pod,) = _by_component(tree_id, "teacher")
    (teacher,) = processes(tree_id, "teacher")
    return pod, teacher[3].config.grpc.port, teacher[3].config.ops.port


def _redis(tree_id: str) -> netpol.Pod:
    (pod,) = _by_component(tree_id, "redis")
    return pod


# ---------------------------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_every_pod_is_isolated_in_both_directions_by_one_policy(tree_id):
    rendered = objects(tree_id)
    for pod in _pods(tree_id):
        policies = netpol.policies_in(rendered, pod.namespace)
        both = [p for p in netpol.selecting(policies, pod, "Ingress") if p in netpol.selecting(policies, pod, "Egress")]
        assert both, f"{pod.where}: no NetworkPolicy selects it with policyTypes [Ingress, Egress]"
    stranger = _stranger(tree_id)
    policies = netpol.policies_in(rendered, stranger.namespace)
    assert not netpol.selecting(policies, stranger, "Ingress"), "the policies must not isolate pods opd does not own"


def test_the_evaluator_follows_the_api():
    """Hand-made cases with known answers: absent selection means open, peers need both selectors, ports ranges."""
    ns = {"kubernetes.io/metadata.name": "a"}
    server = netpol.Pod("a", {"app": "s"}, ns, {"grpc": 50051})
    client = netpol.Pod("a", {"app": "c"}, ns)
    other_ns = netpol.Pod("b", {"app": "c"}, {"kubernetes.io/metadata.name": "b"})
    assert netpol.allowed([], client, server, 1)  # nothing selects either pod
    policy = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "a"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "s"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "c"}}}], "ports": [{"port": "grpc"}]},
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}}],
                    "ports": [{"port": 9000, "endPort": 9010}],
                },
            ],
        },
    }
    assert netpol.allowed([policy], client, server, 50051)
    assert not netpol.allowed([policy], client, server, 50052)
    assert not netpol.allowed([policy], client, server, 50051, "UDP")
    assert not netpol.allowed([policy], other_ns, server, 50051), "a podSelector alone means the policy's namespace"
    assert netpol.allowed([policy], other_ns, server, 9005) and not netpol.allowed([policy], other_ns, server, 9011)
    deny_egress = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "d", "namespace": "a"},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"]},
    }
    assert not netpol.allowed([policy, deny_egress], client, server, 50051), "the client's egress must allow it too"


# ---------------------------------------------------------------------------------------------- required traffic


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_every_pod_resolves_names_with_the_cluster_dns(tree_id):
    for pod in _pods(tree_id):
        for protocol in ("UDP", "TCP"):
            assert netpol.allowed(objects(tree_id), pod, KUBE_DNS, 53, protocol), f"{pod.where}: DNS over {protocol}"
        assert not netpol.allowed(objects(tree_id), pod, KUBE_DNS, 8080), f"{pod.where}: only port 53 of kube-dns"


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_trainer_nodes_reach_each_other_on_rendezvous_and_collective_ports(tree_id):
    rendered = objects(tree_id)
    (trainer,) = processes(tree_id, "train")
    template = trainer[0]
    ns_labels = netpol.namespace_labels(rendered, template.namespace)
    node0, node1 = (
        netpol.Pod(template.namespace, template.pod_labels(index=i), ns_labels, where=f"trainer-{i}") for i in (0, 1)
    )
    for port in (int(trainer[3].torchrun.master_port), COLLECTIVE_PORT):
        assert netpol.allowed(rendered, node1, node0, port) and netpol.allowed(rendered, node0, node1, port), port
    for pod in _pods(tree_id):
        if pod.labels.get("app.kubernetes.io/component") != "trainer":
            assert not netpol.allowed(rendered, pod, node0, int(trainer[3].torchrun.master_port)), pod.where
    assert not netpol.allowed(rendered, node0, INTERNET, 443), "no egress to the internet by default"


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_only_trainers_reach_the_teacher_grpc_port(tree_id):
    rendered = objects(tree_id)
    teacher, grpc_port, _ = _teacher(tree_id)
    for trainer in _by_component(tree_id, "trainer"):
        assert netpol.allowed(rendered, trainer, teacher, grpc_port), f"{trainer.where} cannot reach the teacher"
    for pod in _pods(tree_id) + [_stranger(tree_id), PROMETHEUS]:
        if pod.labels.get("app.kubernetes.io/component") != "trainer":
            assert not netpol.allowed(rendered, pod, teacher, grpc_port), f"{pod.where} reaches the teacher"
    impostor = _stranger(tree_id, **{"app.kubernetes.io/component": "trainer"})  # not app.kubernetes.io/name: opd
    assert not netpol.allowed(rendered, impostor, teacher, grpc_port)


def _team_b(tree_id: str, admitted: bool, teacher_labelled: bool):
    """Objects with team-b's copy of the trainer policies (it applies the same manifests in its namespace), the
    team-b trainer pod, and the teacher pod with its namespace labelled (or not) as a shared teacher's."""
    rendered = list(objects(tree_id))
    for policy in kube.find(objects(tree_id), "NetworkPolicy"):
        copied = copy.deepcopy(policy)
        copied["metadata"]["namespace"] = "team-b"
        rendered.append(copied)
    ns_labels = {"kubernetes.io/metadata.name": "team-b", **({"opd-teacher-client": "true"} if admitted else {})}
    (trainer,) = processes(tree_id, "train")
    student = netpol.Pod("team-b", trainer[0].pod_labels(), ns_labels, where="team-b trainer")
    teacher, grpc_port, _ = _teacher(tree_id)
    if teacher_labelled:
        teacher = dataclasses.replace(
            teacher, namespace_labels={**teacher.namespace_labels, "opd-teacher-server": "true"}
        )
    return rendered, student, teacher, grpc_port


@pytest.mark.parametrize("tree_id", [t for t in TREE_IDS if t != "base"])
def test_another_teams_trainer_needs_both_namespace_labels(tree_id):
    """docs/deploy.md: admit a team by labelling its namespace opd-teacher-client=true and the teacher's namespace
    opd-teacher-server=true (the trainer sends its token only to teachers in namespaces labelled so)."""
    for admitted, labelled in ((True, True), (False, True), (True, False), (False, False)):
        rendered, student, teacher, port = _team_b(tree_id, admitted, labelled)
        assert netpol.allowed(rendered, student, teacher, port) is (admitted and labelled), (admitted, labelled)


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_only_redis_clients_reach_redis(tree_id):
    rendered = objects(tree_id)
    redis = _redis(tree_id)
    clients = {"trainer", "rollout", "rollout-driver", "rollout-ray-worker"}
    for pod in _pods(tree_id):
        component = pod.labels.get("app.kubernetes.io/component")
        if component == "redis":
            continue
        assert netpol.allowed(rendered, pod, redis, 6379) is (component in clients), pod.where
    for outsider in (_stranger(tree_id), _stranger(tree_id, **{"app.kubernetes.io/part-of": "opd"}), PROMETHEUS):
        assert not netpol.allowed(rendered, outsider, redis, 6379), outsider.where


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_prometheus_scrapes_every_ops_port_and_nothing_else(tree_id):
    rendered = objects(tree_id)
    scrapers = [PROMETHEUS] + [p for p in _pods(tree_id) if p.labels.get("app.kubernetes.io/name") == "prometheus"]
    for template, _, _, parsed in opd_processes(tree_id):
        if parsed.component == "rollout" and parsed.config.ray:
            continue  # the driver serves no ops port
        port = parsed.config.ops_port() if parsed.component == "rollout" else parsed.config.ops.port
        pod = netpol.Pod(
            template.namespace,
            template.pod_labels(),
            netpol.namespace_labels(rendered, template.namespace),
            where=template.where,
        )
        for scraper in scrapers:
            assert netpol.allowed(rendered, scraper, pod, port), f"{scraper.where} -> {pod.where}:{port}"
        assert not netpol.allowed(rendered, _stranger(tree_id), pod, port), f"anyone reaches {pod.where}:{port}"
    teacher, grpc_port, _ = _teacher(tree_id)
    assert not netpol.allowed(rendered, PROMETHEUS, teacher, grpc_port)


def test_the_demo_prometheus_and_grafana_talk_only_as_needed():
    rendered = objects("cpu-demo")
    (prometheus,) = [p for p in _pods("cpu-demo") if p.labels.get("app.kubernetes.io/name") == "prometheus"]
    (grafana,) = [p for p in _pods("cpu-demo") if p.labels.get("app.kubernetes.io/name") == "grafana"]
    assert netpol.allowed(rendered, grafana, prometheus, 9090)
    assert netpol.allowed(rendered, prometheus, API_SERVER, 443), "pod discovery through the API server"
    assert not netpol.allowed(rendered, _stranger("cpu-demo"), prometheus, 9090)
    teacher, grpc_port, ops_port = _teacher("cpu-demo")
    assert not netpol.allowed(rendered, grafana, teacher, ops_port)
    assert not netpol.allowed(rendered, prometheus, _redis("cpu-demo"), 6379)


# ---------------------------------------------------------------------------------------------- Ray


def test_ray_ports_are_reachable_only_from_this_clusters_ray_pods_and_the_driver():
    rendered = objects("ray-overlay")
    (head,) = _by_component("ray-overlay", "rollout-ray-head")
    (worker,) = _by_component("ray-overlay", "rollout-ray-worker")
    (driver,) = _by_component("ray-overlay", "rollout-driver")
    gcs, client, dashboard, metrics = head.ports["gcs"], head.ports["client"], 8265, head.ports["metrics"]
    for a, b in ((worker, head), (head, worker), (worker, worker)):
        for port in (gcs, dashboard, COLLECTIVE_PORT):
            assert netpol.allowed(rendered, a, b, port), f"{a.where} -> {b.where}:{port}"
    assert netpol.allowed(rendered, driver, head, client)
    for port in (gcs, dashboard, metrics):
        assert not netpol.allowed(rendered, driver, head, port), f"the driver needs only the client port, not {port}"
    assert not netpol.allowed(rendered, driver, worker, client)
    outsiders = [
        p
        for p in _pods("ray-overlay")
        if not p.labels.get("app.kubernetes.io/component", "").startswith(("rollout-ray", "rollout-driver"))
    ] + [_stranger("ray-overlay"), PROMETHEUS]
    for outsider in outsiders:
        for target in (head, worker):
            for port in (gcs, client, dashboard, COLLECTIVE_PORT):
                assert not netpol.allowed(rendered, outsider, target, port), (
                    f"{outsider.where} -> {target.where}:{port}"
                )
    for target in (head, worker):
        assert netpol.allowed(rendered, PROMETHEUS, target, metrics), f"Prometheus cannot scrape {target.where}"
    assert netpol.allowed(rendered, worker, _redis("ray-overlay"), 6379), "the actors push rollouts"
    assert not netpol.allowed(rendered, head, _redis("ray-overlay"), 6379), "the head runs no actor"
