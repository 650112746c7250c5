"""Kubernetes NetworkPolicy semantics, evaluated offline over rendered manifests.

Owns the decision "may pod A open a connection to pod B on port P/protocol?" as the
networking.k8s.io/v1 API defines it: a pod selected by no policy of a direction is
open in that direction; a pod selected by at least one is closed except for what
some rule of those policies allows; a connection needs the client's egress and the
server's ingress to allow it. Peers: `podSelector` alone means pods of the policy's
namespace, `namespaceSelector` alone every pod of the matching namespaces, both
together the matching pods of the matching namespaces; `ipBlock` peers match only
`External` endpoints (addresses that are not pods). A rule without `ports` allows
every port; `endPort` makes a range. Named ports are resolved against the server
pod's container ports.

Does not model: CNI-specific behaviour (host-network traffic, kubelet probes),
Services (policies act on pod addresses after the Service is resolved).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.deploy import kube


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: Mapping[str, str]
    namespace_labels: Mapping[str, str]
    ports: Mapping[str, int] = field(default_factory=dict)  # named container ports
    where: str = ""


@dataclass(frozen=True)
class External:
    """An address outside the pod network (the API server, the internet)."""

    ip: str


Endpoint = Pod | External


def namespace_labels(objects: Iterable[Mapping[str, Any]], namespace: str) -> dict[str, str]:
    """The labels a namespace carries: its rendered Namespace object's, plus the one Kubernetes always sets."""
    labels = {"kubernetes.io/metadata.name": namespace}
    for obj in objects:
        if obj["kind"] == "Namespace" and obj["metadata"]["name"] == namespace:
            labels.update(obj["metadata"].get("labels", {}))
    return labels


def pods(objects) -> list[Pod]:
    """One Pod per pod template of the rendered objects (JobSet/Job pods with the controllers' labels, index 0)."""
    out = []
    for template in kube.pod_templates(objects):
        ports = {
            p["name"]: int(p["containerPort"]) for c in template.containers() for p in c.get("ports", []) if "name" in p
        }
        out.append(
            Pod(
                template.namespace,
                template.pod_labels(),
                namespace_labels(objects, template.namespace),
                ports,
                template.where,
            )
        )
    return out


def policies_in(objects, namespace: str) -> list[Mapping[str, Any]]:
    return [
        o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"].get("namespace", "default") == namespace
    ]


def _types(policy: Mapping[str, Any]) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def selecting(policies: Iterable[Mapping[str, Any]], pod: Pod, direction: str) -> list[Mapping[str, Any]]:
    """The policies that isolate `pod` in `direction` (Ingress or Egress)."""
    return [p for p in policies if direction in _types(p) and kube.selects(p["spec"]["podSelector"], pod.labels)]


def _peer_matches(peer: Mapping[str, Any], policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if not isinstance(other, External):
            return False
        block = peer["ipBlock"]
        address = ipaddress.ip_address(other.ip)
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if isinstance(other, External):
        return False
    if "namespaceSelector" in peer:
        if not kube.selects(peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return "podSelector" not in peer or kube.selects(peer["podSelector"], other.labels)


def _port_matches(rule_ports: list[Mapping[str, Any]] | None, server: Endpoint, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        number = entry["port"]
        if isinstance(number, str):  # a named port of the server's containers
            number = server.ports.get(number) if isinstance(server, Pod) else None
            if number is None:
                continue
        if number <= port <= entry.get("endPort", number):
            return True
    return False


def _allows(policies, pod: Pod, direction: str, other: Endpoint, server: Endpoint, port: int, protocol: str) -> bool:
    isolating = selecting(policies, pod, direction)
    if not isolating:
        return True
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in isolating:
        namespace = policy["metadata"].get("namespace", "default")
        for rule in policy["spec"].get(rules_key, []):
            if not _port_matches(rule.get("ports"), server, port, protocol):
                continue
            peers = rule.get(peers_key)
            if not peers or any(_peer_matches(peer, namespace, other) for peer in peers):
                return True
    return False


def allowed(objects, client: Endpoint, server: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """Whether `client` may connect to `server`:`port` under the NetworkPolicies of both pods' namespaces."""
    egress_ok = True
    if isinstance(client, Pod):
        egress_ok = _allows(policies_in(objects, client.namespace), client, "Egress", server, server, port, protocol)
    ingress_ok = True
    if isinstance(server, Pod):
        ingress_ok = _allows(policies_in(objects, server.namespace), server, "Ingress", client, server, port, protocol)
    return egress_ok and ingress_ok
