"""Validate custom resources against the vendored CRD schemas (tests/deploy/crds) and their controllers' webhooks.

Owns: loading the trimmed CRD schemas that tests/deploy/crds/vendor.py wrote from the projects' CRD files (one
file per kind and release; crds/README.md lists them), validating an object against every release of its kind
with a JSON-schema validator, and the few admission rules that the controllers enforce in code rather than in the
CRD (JobSet's validating webhook, KubeRay's spec validation). It does not render the
kustomize trees (kube.py) and does not check core objects (kubernetes-validate, in the tests).

Two keywords extend the schemas: `x-opd-core` (an embedded pod or job template: validated against the Kubernetes
API schemas, strict) and `x-opd-trimmed` (a field that exists in the CRD but whose schema was not vendored: an
error that says how to re-vendor).
"""

from __future__ import annotations

import copy
import functools
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from tests.deploy import kube

CRDS = Path(__file__).parent / "crds"


@dataclass(frozen=True)
class VendoredCrd:
    file: str  # e.g. "jobset-v0.6.0.yaml"
    kind: str
    api_version: str
    source: dict[str, str]  # repo, path, tag, commit
    schema: dict[str, Any]


@functools.cache
def vendored() -> tuple[VendoredCrd, ...]:
    out = []
    for path in sorted(CRDS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        out.append(VendoredCrd(path.name, doc["kind"], doc["apiVersion"], doc["source"], doc["schema"]))
    return tuple(out)


def kinds() -> set[str]:
    return {crd.kind for crd in vendored()}


def for_kind(kind: str) -> list[VendoredCrd]:
    return [crd for crd in vendored() if crd.kind == kind]


def _core(validator, core_type, instance, schema):
    """An embedded template: validated against the core Kubernetes API schema of its type (strict)."""
    if not isinstance(instance, dict):
        return  # the `type: object` next to the marker reports it
    if set(instance) - {"metadata", "spec"}:
        yield jsonschema.ValidationError(f"{sorted(set(instance) - {'metadata', 'spec'})}: not fields of a {core_type}")
        return
    template = copy.deepcopy(instance)
    wrapped = (
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        if core_type == "PodTemplateSpec"
        else {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "t", **template.get("metadata", {})},
            "spec": template.get("spec", {}),
        }
    )
    try:
        kubernetes_validate.validate(wrapped, kube.KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        yield jsonschema.ValidationError(f"{'.'.join(map(str, exc.path))}: {exc.message} (core {core_type})")


def _trimmed(validator, _value, instance, schema):
    yield jsonschema.ValidationError(
        "this field exists in the CRD but its schema was not vendored: re-vendor the CRD files of this kind with "
        "tests/deploy/crds/vendor.py (it keeps every field the manifests set)"
    )


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-opd-core": _core, "x-opd-trimmed": _trimmed}
)


def schema_problems(obj: dict[str, Any], crd: VendoredCrd) -> list[str]:
    """What the API server would refuse in `obj` under `crd` (one line each: path, then why)."""
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')} ({crd.file})"
    if obj.get("apiVersion") != crd.api_version:
        return [f"{where}: apiVersion {obj.get('apiVersion')!r}; this vendored CRD schema is for {crd.api_version}"]
    errors = sorted(_Validator(crd.schema).iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# ---------------------------------------------------------------------------------------------- admission rules
# JobSet's validating webhook (kubernetes-sigs/jobset pkg/webhooks/jobset_webhook.go, validateFailurePolicy; the
# same in v0.6.0 and v0.12.0): rule names 1..128 characters matching this pattern and unique, reasons from the
# Job controller's list, targetReplicatedJobs naming replicated jobs.
JOBSET_RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
JOBSET_FAILURE_REASONS = {
    "BackoffLimitExceeded",
    "DeadlineExceeded",
    "FailedIndexes",
    "MaxFailedIndexesExceeded",
    "PodFailurePolicy",
}
# KubeRay (ray-project/kuberay ray-operator/controllers/ray/utils/validation.go, ValidateRayClusterSpec, v1.5.1 and
# v1.7.0): token authentication needs a rayVersion of 2.52.0 or later.
RAY_TOKEN_MIN_VERSION = (2, 52, 0)


def jobset_webhook_problems(jobset: dict[str, Any]) -> list[str]:
    spec = jobset["spec"]
    job_names = {job["name"] for job in spec.get("replicatedJobs", [])}
    rules = spec.get("failurePolicy", {}).get("rules", [])
    problems = [
        f"failurePolicy rule name {n!r} is used more than once"
        for n, c in Counter(r["name"] for r in rules).items()
        if c > 1
    ]
    for rule in rules:
        if not (1 <= len(rule["name"]) <= 128 and JOBSET_RULE_NAME.match(rule["name"])):
            problems.append(f"failurePolicy rule name {rule['name']!r} does not match {JOBSET_RULE_NAME.pattern}")
        problems += [
            f"failurePolicy rule {rule['name']}: unknown job failure reason {reason!r}"
            for reason in rule.get("onJobFailureReasons", [])
            if reason not in JOBSET_FAILURE_REASONS
        ]
        problems += [
            f"failurePolicy rule {rule['name']}: no replicated job {name!r}"
            for name in rule.get("targetReplicatedJobs", [])
            if name not in job_names
        ]
    problems += [
        f"successPolicy: no replicated job {name!r}"
        for name in spec.get("successPolicy", {}).get("targetReplicatedJobs", [])
        if name not in job_names
    ]
    return problems


def raycluster_validation_problems(cluster: dict[str, Any]) -> list[str]:
    spec = cluster["spec"]
    if spec.get("authOptions", {}).get("mode") != "token":
        return []
    version = tuple(int(x) for x in re.findall(r"\d+", spec.get("rayVersion", ""))[:3])
    if version < RAY_TOKEN_MIN_VERSION:
        return [f"authOptions.mode token needs rayVersion >= 2.52.0, got {spec.get('rayVersion')!r}"]
    return []


ADMISSION_RULES = {"JobSet": jobset_webhook_problems, "RayCluster": raycluster_validation_problems}


def problems(obj: dict[str, Any]) -> list[str]:
    """Schema problems under every vendored release of the object's kind, then the controller's admission rules."""
    crds = for_kind(obj["kind"])
    assert crds, f"no vendored CRD for {obj['kind']} in {CRDS}"
    found = [p for crd in crds for p in schema_problems(obj, crd)]
    rules = ADMISSION_RULES.get(obj["kind"])
    if rules and not found:
        found += [f"{obj['kind']}/{obj['metadata']['name']}: {p}" for p in rules(obj)]
    return found
