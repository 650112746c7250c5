"""Vendor a trimmed copy of a CustomResourceDefinition's schema for tests/deploy.

Owns: turning one version of a real CRD file into the small JSON schema that tests/deploy/crd_check.py validates
the custom resources against. It does not validate anything itself.

What the trimmed schema keeps and drops:
- `apiVersion`, `kind`, `metadata` and `spec` of the version's openAPIV3Schema; `status` and every `description`
  are dropped;
- every field our manifests set keeps the CRD's schema (types, enums, patterns, required keys, bounds, and the
  CRD's CEL rules, which are copied but not evaluated);
- every other field keeps its name with the marker `x-opd-trimmed` (the field exists, its schema was not
  vendored): crd_check fails on a manifest that sets it and asks for a re-vendor;
- embedded pod templates (JobSet `replicatedJobs[].template`, RayCluster `headGroupSpec.template` and
  `workerGroupSpecs[].template`) become the marker `x-opd-core` naming the core type: crd_check validates them
  against the Kubernetes API schemas instead;
- an object that lists `properties` and neither preserves unknown fields nor has `additionalProperties` gets
  `additionalProperties: false`: the API server rejects unknown fields under strict field validation (kubectl's
  default) and drops them silently otherwise, so either way a misspelled field is a bug;
- `nullable: true` becomes a `null` in the type list;
- a required field with a `default` leaves `required`: the API server applies the default before it validates.

Usage (re-vendor after adding a field to a custom resource, or to follow a new controller release), from the
repository root, with the CRD file of the release taken from the project's repository or release assets:

    .venv/bin/python -m tests.deploy.crds.vendor --crd jobset.x-k8s.io_jobsets.yaml --version v1alpha2 \\
        --repo kubernetes-sigs/jobset --path config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml \\
        --tag v0.12.0 --commit f22e565ac3cc3265c7c45ef67ecffdc689af5d77 --out tests/deploy/crds/jobset-v0.12.0.yaml

The fields kept are those set by any object of that kind in the rendered kustomize trees (tests/deploy/kube.py)
and in deploy/k8s/components.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml

# Embedded templates validated against the core API (crd_check), by kind: path from the root, "[]" = list items.
CORE_TEMPLATES = {
    "JobSet": [(("spec", "replicatedJobs", "[]", "template"), "JobTemplateSpec")],
    "RayCluster": [
        (("spec", "headGroupSpec", "template"), "PodTemplateSpec"),
        (("spec", "workerGroupSpecs", "[]", "template"), "PodTemplateSpec"),
    ],
}
LICENSE = "Apache-2.0"


def version_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return copy.deepcopy(entry["schema"]["openAPIV3Schema"])
    served = [entry["name"] for entry in crd["spec"]["versions"]]
    raise SystemExit(f"--version {version}: the CRD serves {served}; pass one of them")


def _replace_core_templates(schema: dict[str, Any], kind: str) -> None:
    for path, core_type in CORE_TEMPLATES.get(kind, []):
        node = schema
        for step in path[:-1]:
            node = node["items"] if step == "[]" else node["properties"][step]
        node["properties"][path[-1]] = {"type": "object", "x-opd-core": core_type}


def trim(schema: dict[str, Any], values: list[Any]) -> dict[str, Any]:
    """`schema` without descriptions, with the subtrees that none of `values` (instances at this node) sets trimmed."""
    out = {k: v for k, v in schema.items() if k not in ("description", "properties", "items", "additionalProperties")}
    if schema.get("nullable"):
        out.pop("nullable")
        out["type"] = [schema["type"], "null"]
    if "properties" in schema:
        objects = [v for v in values if isinstance(v, dict)]
        out["properties"] = {}
        for name, sub in schema["properties"].items():
            used = [o[name] for o in objects if name in o]
            out["properties"][name] = trim(sub, used) if used or "x-opd-core" in sub else {"x-opd-trimmed": True}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        defaulted = {name for name, sub in schema["properties"].items() if "default" in sub}
        if "required" in schema:
            out["required"] = [name for name in schema["required"] if name not in defaulted]
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = trim(
            schema["additionalProperties"], [x for v in values if isinstance(v, dict) for x in v.values()]
        )
    elif "additionalProperties" in schema:
        out["additionalProperties"] = schema["additionalProperties"]
    if "items" in schema:
        out["items"] = trim(schema["items"], [x for v in values if isinstance(v, list) for x in v])
    return out


def vendored(crd: dict[str, Any], version: str, instances: list[dict[str, Any]]) -> dict[str, Any]:
    kind = crd["spec"]["names"]["kind"]
    schema = version_schema(crd, version)
    schema["properties"].pop("status", None)
    _replace_core_templates(schema, kind)
    return {"kind": kind, "apiVersion": f"{crd['spec']['group']}/{version}", "schema": trim(schema, instances)}


def manifest_instances(kind: str) -> list[dict[str, Any]]:
    """Every object of `kind` in the rendered trees and in deploy/k8s/components (imports kubectl-dependent code)."""
    from tests.deploy import kube

    found = [o for _, directory in kube.TREES for o in kube.render(directory) if o["kind"] == kind]
    for path in sorted((kube.K8S / "components").glob("*/*.yaml")):
        found += [o for o in yaml.safe_load_all(path.read_text()) if isinstance(o, dict) and o.get("kind") == kind]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crd", type=Path, required=True, help="the CRD YAML file of the release")
    parser.add_argument("--version", required=True, help="the API version to vendor, e.g. v1alpha2")
    parser.add_argument("--repo", required=True, help="owner/name of the project the CRD comes from")
    parser.add_argument("--path", required=True, help="the CRD file's path in that repository")
    parser.add_argument("--tag", required=True, help="the release tag read")
    parser.add_argument("--commit", required=True, help="the commit the tag points at")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    crd = yaml.safe_load(args.crd.read_text())
    kind = crd["spec"]["names"]["kind"]
    instances = manifest_instances(kind)
    if not instances:
        raise SystemExit(f"no {kind} in deploy/k8s: nothing to vendor")
    doc = vendored(crd, args.version, instances)
    doc = {"source": {"repo": args.repo, "path": args.path, "tag": args.tag, "commit": args.commit}, **doc}
    header = (
        f"# Trimmed from github.com/{args.repo}, file {args.path},\n"
        f"# release {args.tag} (commit {args.commit}); licensed {LICENSE}\n"
        f"# (https://www.apache.org/licenses/LICENSE-2.0). Version {args.version} of the CRD's openAPIV3Schema\n"
        "# without descriptions and status; fields the manifests do not set are trimmed\n"
        "# (x-opd-trimmed), pod templates are checked against the core API (x-opd-core). Generated by\n"
        "# tests/deploy/crds/vendor.py: edit by re-running it, not by hand.\n"
    )
    args.out.write_text(header + yaml.safe_dump(doc, sort_keys=False, width=120))


if __name__ == "__main__":
    main()
