"""The trainer on Kubernetes: a JobSet that restarts the whole group when one pod fails, the stop grace that lets
it checkpoint, optional Kueue gang admission, and preset edits that `kubectl apply -k` can apply.

Preset edits (the design of the check): `kubectl apply` patches objects in place, and the API server (or the
JobSet webhook) refuses a patch that changes an immutable field, e.g. a Job's or JobSet's pod template. A preset
ends up in ConfigMaps; if a pod template of an immutable object referred to a ConfigMap whose name carries a
content hash, editing the preset would rename the ConfigMap, change that template and make the apply fail. The
test copies deploy/k8s to a temporary directory, renders every tree, edits every preset in the copy, renders
again, and compares the two renders object by object (kind + name): for every object present in both, the fields
the API treats as immutable (IMMUTABLE below, a conservative list) must be equal. New objects (a ConfigMap with a
new hash) are fine: apply creates them. It also checks that the edit did reach the cluster objects (the presets'
ConfigMaps changed), and, as a control, that the same comparison flags the JobSet when its template is pointed at
the hashed ConfigMap.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy import crd_check, kube
from tests.deploy.test_kustomize import TREE_IDS, processes

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(kube.kubectl() is None, reason="kubectl (with kustomize) is not on PATH"),
]

STOP_GRACE_DEFAULT_S = 60  # the trainer's stop_grace_s default (student_trainer/config.py)
TORCHRUN_MARGIN_S = 15  # at least this between torchrun's shutdown timeout and the kubelet's SIGKILL


def _trainer(tree_id: str):
    (trainer,) = processes(tree_id, "train")
    return trainer


# ---------------------------------------------------------------------------------------------- failure policy


def jobset_action(jobset: dict, reason: str, replicated_job: str) -> str:
    """The JobSet controller's decision for a child Job that failed with `reason`: the first rule whose reasons
    and target replicated jobs match (an empty list matches all), else the default, RestartJobSet."""
    for rule in jobset["spec"].get("failurePolicy", {}).get("rules", []):
        reasons, targets = rule.get("onJobFailureReasons", []), rule.get("targetReplicatedJobs", [])
        if (not reasons or reason in reasons) and (not targets or replicated_job in targets):
            return rule["action"]
    return "RestartJobSet" if jobset["spec"].get("failurePolicy") else "FailJobSet"


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_one_failed_pod_restarts_the_whole_group_a_bounded_number_of_times(tree_id):
    template = _trainer(tree_id)[0]
    jobset, job = template.owner, template.job_spec
    assert job["backoffLimit"] == 0, "the first failed pod must fail its Job (no lone replacement pod)"
    assert template.spec["restartPolicy"] == "Never", "no in-place container restart either"
    assert not [r for r in job.get("podFailurePolicy", {}).get("rules", []) if r["action"] in ("Ignore", "Count")]
    policy = jobset["spec"]["failurePolicy"]
    assert 1 <= policy["maxRestarts"] <= 100, "bounded: a crash loop ends"
    name = template.replicated_job["name"]
    assert jobset_action(jobset, "BackoffLimitExceeded", name) == "RestartJobSet"
    for reason in ("PodFailurePolicy", "DeadlineExceeded"):
        assert jobset_action(jobset, reason, name) == "RestartJobSet", reason
    assert all(r["action"] != "RestartJobSetAndIgnoreMaxRestarts" for r in policy["rules"]), (
        "every restart counts: an eviction that repeats (e.g. a full emptyDir) must not loop forever"
    )
    assert [rj["name"] for rj in jobset["spec"]["replicatedJobs"]] == [name], "the restart covers every node"


def test_the_failure_policy_model_follows_the_rules():
    jobset = {
        "spec": {
            "failurePolicy": {
                "maxRestarts": 3,
                "rules": [
                    {"name": "A", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
                    {"name": "B", "action": "RestartJobSetAndIgnoreMaxRestarts", "targetReplicatedJobs": ["workers"]},
                ],
            }
        }
    }
    assert jobset_action(jobset, "PodFailurePolicy", "workers") == "FailJobSet"
    assert jobset_action(jobset, "BackoffLimitExceeded", "workers") == "RestartJobSetAndIgnoreMaxRestarts"
    assert jobset_action(jobset, "BackoffLimitExceeded", "driver") == "RestartJobSet"
    assert jobset_action({"spec": {}}, "BackoffLimitExceeded", "x") == "FailJobSet"


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_stop_grace_sets_torchruns_shutdown_timeout_and_the_pods_termination_grace(tree_id):
    template, _, env, parsed = _trainer(tree_id)
    config = parsed.config
    if "stop_grace_s" in type(config).model_fields:
        stop_grace = config.stop_grace_s
    else:  # the trainer config predates stop_grace_s: the manifests still set it for when it arrives
        stop_grace = float(env.get("OPD_TRAIN__STOP_GRACE_S", STOP_GRACE_DEFAULT_S))
    assert int(parsed.torchrun.shutdown_timeout) == stop_grace, "torchrun waits the trainer's stop grace"
    assert template.spec["terminationGracePeriodSeconds"] >= stop_grace + TORCHRUN_MARGIN_S, (
        "the kubelet's SIGKILL must come after torchrun's shutdown timeout"
    )


# ---------------------------------------------------------------------------------------------- Kueue


def _render_with(tmp_path: Path, resource: Path, component: Path, namespace: str) -> tuple[dict, ...]:
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": namespace,
                "resources": [os.path.relpath(resource, tmp_path)],
                "components": [os.path.relpath(component, tmp_path)],
            }
        )
    )
    return kube.render_uncached(tmp_path)


def test_kueue_component_queues_the_jobset_as_one_workload(tmp_path):
    plain = kube.render(kube.K8S / "overlays" / "gpu")
    queued = _render_with(tmp_path, kube.K8S / "overlays" / "gpu", kube.K8S / "components" / "kueue", "opd")
    (queue,) = kube.find(queued, "LocalQueue")
    assert crd_check.problems(queue) == [] and queue["metadata"]["namespace"] == "opd"
    jobset = kube.one(queued, "JobSet", "opd-trainer")
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue["metadata"]["name"]
    before = copy.deepcopy(kube.one(plain, "JobSet", "opd-trainer"))
    after = copy.deepcopy(jobset)
    del after["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    assert after == before, "the component only adds the queue label"
    assert len(queued) == len(plain) + 1


# ---------------------------------------------------------------------------------------------- preset edits


def _without(mapping: dict, *keys: str) -> dict:
    return {k: v for k, v in mapping.items() if k not in keys}


# What the API server (or, for JobSet, its webhook) refuses to change on an existing object; conservative.
IMMUTABLE = {
    "JobSet": lambda o: _without(o["spec"], "suspend"),
    "Job": lambda o: _without(
        o["spec"],
        "parallelism",
        "suspend",
        "activeDeadlineSeconds",
        "backoffLimit",
        "ttlSecondsAfterFinished",
        "managedBy",
    ),
    "StatefulSet": lambda o: {
        k: o["spec"].get(k) for k in ("selector", "serviceName", "volumeClaimTemplates", "podManagementPolicy")
    },
    "Deployment": lambda o: o["spec"]["selector"],
    "DaemonSet": lambda o: o["spec"]["selector"],
    "Service": lambda o: {k: o["spec"].get(k) for k in ("clusterIP", "clusterIPs")},
    "PersistentVolumeClaim": lambda o: _without(o["spec"], "resources", "volumeAttributesClassName"),
    "ConfigMap": lambda o: {k: o.get(k) for k in ("data", "binaryData")} if o.get("immutable") else None,
    "Secret": lambda o: {k: o.get(k) for k in ("data", "stringData")} if o.get("immutable") else None,
}


def immutable_changes(before, after) -> list[str]:
    """Objects present in both renders whose immutable fields differ."""
    old = {(o["kind"], o["metadata"]["name"]): o for o in before}
    problems = []
    for obj in after:
        key = (obj["kind"], obj["metadata"]["name"])
        if key in old and obj["kind"] in IMMUTABLE and IMMUTABLE[obj["kind"]](old[key]) != IMMUTABLE[obj["kind"]](obj):
            problems.append(f"{key[0]}/{key[1]}")
    return problems


def _edit_presets(k8s: Path) -> None:
    presets = sorted((k8s / "base" / "presets").glob("*.yaml")) + sorted((k8s / "student" / "presets").glob("*.yaml"))
    assert presets
    for preset in presets:  # a real value change as well as new text: the loaded preset differs
        data = yaml.safe_load(preset.read_text())
        data["log_level"] = "DEBUG" if data.get("log_level") != "DEBUG" else "INFO"
        preset.write_text(preset.read_text() + f"\n# edited by tests/deploy\nlog_level: {data['log_level']}\n")


def _renders(k8s: Path, tree: Path) -> tuple[dict, ...]:
    return kube.render_uncached(k8s / tree.relative_to(kube.K8S))


@pytest.fixture(scope="module")
def edited_copy(tmp_path_factory):
    """(before, after) renders of every tree, from a copy of deploy/k8s whose presets are edited in between."""
    k8s = tmp_path_factory.mktemp("deploy") / "k8s"
    shutil.copytree(kube.K8S, k8s)
    before = {tree_id: _renders(k8s, tree) for tree_id, tree in kube.TREES}
    _edit_presets(k8s)
    after = {tree_id: _renders(k8s, tree) for tree_id, tree in kube.TREES}
    return k8s, before, after


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_a_preset_edit_changes_no_immutable_field(tree_id, edited_copy):
    _, before, after = edited_copy
    assert immutable_changes(before[tree_id], after[tree_id]) == []
    fixed = {(o["kind"], o["metadata"]["name"]): o for o in before[tree_id]}[("ConfigMap", "opd-trainer-presets")]
    (new_fixed,) = [
        o for o in after[tree_id] if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "opd-trainer-presets"
    ]
    assert new_fixed["data"] != fixed["data"], "the edit reaches the trainer's presets ConfigMap"
    old_names = {o["metadata"]["name"] for o in before[tree_id] if o["kind"] == "ConfigMap"}
    new_names = {o["metadata"]["name"] for o in after[tree_id] if o["kind"] == "ConfigMap"}
    assert any(n.startswith("opd-presets-") for n in new_names - old_names), "the hashed ConfigMap is renamed"
    jobset_before = kube.one(before[tree_id], "JobSet", "opd-trainer")
    volumes = jobset_before["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "presets", "configMap": {"name": "opd-trainer-presets"}} in volumes
    assert "opd-presets" not in yaml.safe_dump(jobset_before["spec"]).replace("opd-presets/", ""), (
        "the JobSet must not refer to the hashed presets ConfigMap, nor embed preset content"
    )


def test_the_immutability_check_catches_a_jobset_on_the_hashed_configmap(tmp_path):
    """The hazard itself: the JobSet pointed at the hashed ConfigMap (kustomize follows the JobSet's volume path:
    deploy/k8s/student/kustomizeconfig.yaml teaches it, so that a student's namePrefix reaches the JobSet)."""
    k8s = tmp_path / "k8s"
    shutil.copytree(kube.K8S, k8s)
    trainer = k8s / "student" / "trainer.yaml"
    text = trainer.read_text()
    assert text.count("name: opd-trainer-presets") == 1
    trainer.write_text(text.replace("name: opd-trainer-presets", "name: opd-rollout-presets"))
    tree = kube.K8S / "overlays" / "gpu"
    before = _renders(k8s, tree)
    _edit_presets(k8s)
    after = _renders(k8s, tree)
    assert "JobSet/opd-trainer" in immutable_changes(before, after)
