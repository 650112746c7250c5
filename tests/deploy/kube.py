"""Render the kustomize trees with `kubectl kustomize` and walk what they produce.

Owns: locating kubectl, rendering (cached per directory), finding pod templates
in workload objects (Deployment, StatefulSet, Job, JobSet replicated jobs, and
KubeRay's RayCluster head and worker groups) with the labels their controllers
add to the pods, and resolving a container's environment the way the kubelet
does: `$(VAR)` references expand from variables defined earlier in the list,
Secret and downward-API values become recognisable placeholders.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.commands import REPO

K8S = REPO / "deploy" / "k8s"
# (id, directory): the base and every overlay; ids avoid a bare "gpu" (that keyword marks CUDA-only tests).
TREES = [
    ("base", K8S / "base"),
    ("cpu-demo", K8S / "overlays" / "cpu-demo"),
    ("gpu-overlay", K8S / "overlays" / "gpu"),
    ("ray-overlay", K8S / "overlays" / "ray"),
]
# The long-lived bundle applied once beside each tree (Namespace, PriorityClasses, PVCs): `kubectl delete -k` of the
# tree must not reach these objects, but the tree's pods refer to them.
BUNDLES = {
    "base": K8S / "cluster",
    "cpu-demo": K8S / "overlays" / "cpu-demo" / "cluster",
    "gpu-overlay": K8S / "overlays" / "gpu" / "cluster",
    "ray-overlay": K8S / "overlays" / "ray" / "cluster",
}
LONG_LIVED_KINDS = {"Namespace", "PriorityClass", "PersistentVolumeClaim"}
KUBERNETES_VERSION = "1.32"  # the kubectl/kustomize on the build machines; manifests validate against its API
# Created by the operator (see deploy/k8s/base/kustomization.yaml), each mounted as files: name -> keys read.
EXTERNAL_SECRETS = {
    "opd-redis": {"password"},
    "opd-teacher-tokens": {"tokens.yaml"},
    "opd-student-tokens": None,  # one key per student name
    "opd-teacher-tls": {"tls.crt", "tls.key", "ca.crt"},
    "opd-student-certs": None,  # <name>.crt and <name>.key per student (components/mtls)
    "opd-grafana": {"admin-password"},
}
_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
JOB_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def kubectl() -> str | None:
    return shutil.which("kubectl")


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize DIR` as a tuple of objects (callers must not mutate them)."""
    return render_uncached(directory)


def render_uncached(directory: Path) -> tuple[dict[str, Any], ...]:
    exe = kubectl()
    assert exe, "kubectl is not installed"
    out = subprocess.run([exe, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def find(objects, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects, kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


@dataclass
class PodTemplate:
    owner: dict[str, Any]  # the workload object
    where: str  # e.g. "Deployment/opd-teacher", "JobSet/opd-trainer/node", "RayCluster/opd-rollout-ray/gpu-workers"
    template: dict[str, Any]  # {metadata, spec}
    replicated_job: dict[str, Any] | None = None  # JobSet: the replicatedJobs entry holding the template

    @property
    def labels(self) -> dict[str, str]:
        return self.template.get("metadata", {}).get("labels", {})

    @property
    def namespace(self) -> str:
        return self.owner["metadata"].get("namespace", "default")

    @property
    def job_spec(self) -> dict[str, Any] | None:
        """The batch/v1 JobSpec the pods come from (a Job's spec, or a JobSet replicated job's template spec)."""
        if self.owner["kind"] == "Job":
            return self.owner["spec"]
        if self.replicated_job is not None:
            return self.replicated_job["template"]["spec"]
        return None

    def job_name(self, job_index: int = 0) -> str | None:
        if self.owner["kind"] == "Job":
            return self.owner["metadata"]["name"]
        if self.replicated_job is not None:  # JobSet names its Jobs <jobset>-<replicated job>-<job index>
            return f"{self.owner['metadata']['name']}-{self.replicated_job['name']}-{job_index}"
        return None

    def pod_labels(self, index: int = 0, job_index: int = 0) -> dict[str, str]:
        """Labels of a created pod: the Job controller adds the job name and, when indexed, the completion index;
        the JobSet controller adds its jobset.sigs.k8s.io labels."""
        labels = dict(self.labels)
        job = self.job_name(job_index)
        if job is not None:
            labels.update({"job-name": job, "batch.kubernetes.io/job-name": job})
            if self.job_spec.get("completionMode") == "Indexed":
                labels["batch.kubernetes.io/job-completion-index"] = str(index)
        if self.replicated_job is not None:
            labels.update(
                {
                    "jobset.sigs.k8s.io/jobset-name": self.owner["metadata"]["name"],
                    "jobset.sigs.k8s.io/replicatedjob-name": self.replicated_job["name"],
                    "jobset.sigs.k8s.io/job-index": str(job_index),
                }
            )
        return labels

    def hostname(self, index: int = 0, job_index: int = 0) -> str | None:
        """An indexed Job's pod hostname (<job name>-<completion index>), None for other pods."""
        job = self.job_name(job_index)
        if job is None or self.job_spec.get("completionMode") != "Indexed":
            return None
        return f"{job}-{index}"

    @property
    def annotations(self) -> dict[str, str]:
        return self.template.get("metadata", {}).get("annotations", {})

    @property
    def spec(self) -> dict[str, Any]:
        return self.template["spec"]

    def containers(self, init: bool = False) -> list[dict[str, Any]]:
        return list(self.spec.get("containers", [])) + (list(self.spec.get("initContainers", [])) if init else [])

    def volumes(self) -> list[dict[str, Any]]:
        """The pod's volumes, a StatefulSet's claim templates included (as persistentVolumeClaim volumes)."""
        claims = [
            {"name": c["metadata"]["name"], "persistentVolumeClaim": {"claimName": c["metadata"]["name"]}}
            for c in self.owner.get("spec", {}).get("volumeClaimTemplates", [])
        ]
        return list(self.spec.get("volumes", [])) + claims

    def volume(self, name: str) -> dict[str, Any]:
        (vol,) = [v for v in self.volumes() if v["name"] == name]
        return vol


def pod_templates(objects) -> Iterator[PodTemplate]:
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield PodTemplate(obj, f"{kind}/{name}", obj["spec"]["template"])
        elif kind == "JobSet":
            for rjob in obj["spec"]["replicatedJobs"]:
                yield PodTemplate(obj, f"{kind}/{name}/{rjob['name']}", rjob["template"]["spec"]["template"], rjob)
        elif kind == "RayCluster":
            yield PodTemplate(obj, f"{kind}/{name}/head", obj["spec"]["headGroupSpec"]["template"])
            for group in obj["spec"].get("workerGroupSpecs", []):
                yield PodTemplate(obj, f"{kind}/{name}/{group['groupName']}", group["template"])


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) or a plain Service selector against pod labels."""
    match = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    if any(labels.get(k) != v for k, v in match.items() if k not in ("matchLabels", "matchExpressions")):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if (op == "In" and value not in expr["values"]) or (op == "NotIn" and value in expr["values"]):
            return False
        if (op == "Exists" and value is None) or (op == "DoesNotExist" and value is not None):
            return False
    return True


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion (unknown references stay as written, `$$` is a literal `$`)."""

    def one_ref(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match[1], match.group(0))

    return _REF.sub(one_ref, text)


def references(text: str) -> list[str]:
    return [m[1] for m in _REF.finditer(text) if m[1]]


def _env_value(item: Mapping[str, Any], job_index: str) -> str:
    if "value" in item:
        return str(item["value"])
    source = item["valueFrom"]
    if "secretKeyRef" in source:
        return f"SECRET.{source['secretKeyRef']['name']}.{source['secretKeyRef']['key']}"
    if "configMapKeyRef" in source:
        return f"CONFIGMAP.{source['configMapKeyRef']['name']}.{source['configMapKeyRef']['key']}"
    if "fieldRef" in source:
        path = source["fieldRef"]["fieldPath"]
        return job_index if path == JOB_INDEX_FIELD else f"FIELD.{path}"
    return "RESOURCE." + str(source.get("resourceFieldRef", {}).get("resource"))


def container_env(container: Mapping[str, Any], job_index: str = "0") -> dict[str, str]:
    """The container's environment as the process sees it (Secrets as SECRET.name.key placeholders).

    Raises AssertionError for a `$(VAR)` that refers to a variable not defined earlier in the list: the kubelet
    would leave it unexpanded.
    """
    env: dict[str, str] = {}
    for item in container.get("env", []):
        raw = _env_value(item, job_index)
        undefined = [ref for ref in references(raw) if ref not in env]
        assert not undefined, f"env {item['name']} refers to {undefined} before they are defined"
        env[item["name"]] = expand(raw, env)
    return env


def command_line(container: Mapping[str, Any], env: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(command, args) after `$(VAR)` expansion; a reference to an undefined variable is an error."""
    command, args = list(container.get("command", [])), list(container.get("args", []))
    for part in command + args:
        undefined = [ref for ref in references(part) if ref not in env]
        assert not undefined, f"{container['name']}: {part!r} refers to undefined {undefined}"
    return [expand(c, env) for c in command], [expand(a, env) for a in args]


def mount_for(template: PodTemplate, container: Mapping[str, Any], path: str):
    """(volume, volumeMount) of the deepest mount holding `path`, or None."""
    best = None
    for mount in container.get("volumeMounts", []):
        target = mount["mountPath"].rstrip("/")
        holds = path == target or path.startswith(target + "/")
        if holds and (best is None or len(target) > len(best[1]["mountPath"].rstrip("/"))):
            best = (template.volume(mount["name"]), mount)
    return best


def volume_source(volume: Mapping[str, Any], mount: Mapping[str, Any]) -> tuple[str, str, str]:
    """(kind, name, subPath) identifying what a mount shows, comparable across pods."""
    for kind, key in (("persistentVolumeClaim", "claimName"), ("configMap", "name"), ("secret", "secretName")):
        if kind in volume:
            return kind, volume[kind][key], mount.get("subPath", "")
    return next(k for k in volume if k != "name"), volume["name"], mount.get("subPath", "")


def secret_file(template: PodTemplate, container: Mapping[str, Any], path: str) -> tuple[str, str] | None:
    """(Secret name, key) of the file at `path` in the container, when a Secret volume puts it there."""
    found = mount_for(template, container, path)
    if found is None or "secret" not in found[0]:
        return None
    volume, mount = found
    relative = (mount.get("subPath", "") + "/" + path[len(mount["mountPath"].rstrip("/")) :]).strip("/")
    items = volume["secret"].get("items")
    if items is None:
        return volume["secret"]["secretName"], relative
    keys = [item["key"] for item in items if item["path"] == relative]
    return (volume["secret"]["secretName"], keys[0]) if keys else None


def container_port(container: Mapping[str, Any], name: str) -> int | None:
    for port in container.get("ports", []):
        if port.get("name") == name:
            return int(port["containerPort"])
    return None
