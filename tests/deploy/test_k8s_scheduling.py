"""Sharing a cluster: every pod has one of opd's PriorityClasses (teacher above trainer above rollout), teacher
replicas avoid each other's nodes, GPU pods ask for exactly what they may use (requests = limits: Guaranteed),
and the GPU trainer is placed whole (JobSet exclusive topology). On the rendered trees and their bundles."""

from __future__ import annotations

import pytest

from tests.deploy import crd_check, kube
from tests.deploy.test_kustomize import TREE_IDS, objects

pytestmark = pytest.mark.skipif(kube.kubectl() is None, reason="kubectl is not installed (it renders kustomize)")

CLASS_OF = {"teacher": "opd-teacher", "redis": "opd-teacher", "trainer": "opd-trainer"}  # others: opd-rollout


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_every_pod_has_its_priority_class_and_the_classes_are_ordered(tree_id):
    rendered = objects(tree_id)
    classes = {c["metadata"]["name"]: c for c in kube.find(rendered, "PriorityClass")}
    assert classes["opd-teacher"]["value"] > classes["opd-trainer"]["value"] > classes["opd-rollout"]["value"]
    assert not any(c.get("globalDefault") for c in classes.values()), "opd must not change other teams' default"
    assert classes["opd-rollout"]["preemptionPolicy"] == "Never", "rollout pods never preempt anyone"
    for template in kube.pod_templates(rendered):
        component = template.labels.get("app.kubernetes.io/component", "")
        if template.labels.get("app.kubernetes.io/part-of") != "opd":
            continue  # the in-namespace Prometheus and Grafana (opd-monitoring)
        expected = CLASS_OF.get(component, "opd-rollout")
        assert template.spec.get("priorityClassName") == expected, f"{template.where}: {expected}"


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_teacher_replicas_spread_over_nodes(tree_id):
    (teacher,) = [t for t in kube.pod_templates(objects(tree_id)) if t.where == "Deployment/opd-teacher"]
    anti = teacher.spec["affinity"]["podAntiAffinity"]
    terms = anti.get("requiredDuringSchedulingIgnoredDuringExecution") or [
        t["podAffinityTerm"] for t in anti["preferredDuringSchedulingIgnoredDuringExecution"]
    ]
    (term,) = terms
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert kube.selects(term["labelSelector"], teacher.labels), "the term must match the teacher's own pods"
    replicas = teacher.owner["spec"]["replicas"]
    if replicas > 1:  # several GPU replicas: required, so that one node's loss takes one replica
        assert "requiredDuringSchedulingIgnoredDuringExecution" in anti, tree_id
        assert teacher.owner["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "no surge pod left pending"


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_gpu_pods_request_what_they_limit(tree_id):
    found = 0
    for template in kube.pod_templates(objects(tree_id)):
        for container in template.containers():
            resources = container.get("resources", {})
            if "nvidia.com/gpu" in resources.get("limits", {}):
                found += 1
                assert resources["requests"] == resources["limits"], f"{template.where}/{container['name']}"
    assert found or tree_id in ("base", "cpu-demo")


@pytest.mark.parametrize("tree_id", ["gpu-overlay", "ray-overlay"])
def test_gpu_trainer_is_placed_whole(tree_id):
    (jobset,) = kube.find(objects(tree_id), "JobSet")
    key = jobset["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"]
    assert key and "/" in key, "a node label naming the trainer's topology domain"
    assert crd_check.problems(jobset) == []
