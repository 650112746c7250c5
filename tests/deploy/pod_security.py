"""Offline checks of pod templates and compose services: the Pod Security Standards and where secrets may appear.

Owns two rule sets. `restricted_violations` is the Kubernetes `restricted` Pod
Security Standard (which includes `baseline`), as the admission controller
evaluates it, written from the published standard. `secret_leaks` decides
whether a container could carry a secret that does not come from a Secret:
values that hold secrets (variables named like a password or token, passwords
inside URLs) must be Secret references (`valueFrom.secretKeyRef`) or built only
from variables that are, and no command line may contain a Secret-derived value
at all (a process's arguments are readable by every user of the node).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tests.deploy import kube

SECRET_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|API_?KEY|CREDENTIAL|_AUTH$", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:([^@/\s]*)@", re.IGNORECASE)
_SECRET_FLAG = re.compile(r"^--?[\w-]*(pass|token|secret|api-?key)[\w-]*(=|$)", re.IGNORECASE)
_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Literal text allowed around Secret references in a secret-holding value: client names and separators
# (`student-a:$(TOKEN),student-b:$(TOKEN_B)`).
_FRAMING = re.compile(r"^(?:[a-z0-9][a-z0-9_.-]*:|,)*$")

RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def _all_containers(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])]


def restricted_violations(spec: Mapping[str, Any]) -> list[str]:
    """Why a pod spec fails the `restricted` Pod Security Standard (empty when it passes)."""
    problems = []
    pod_ctx = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(f"{key} is set")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']}: type {sorted(kinds)} is not allowed")
    for sysctl in pod_ctx.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            problems.append(f"sysctl {sysctl['name']} is not in the safe set")
    if pod_ctx.get("runAsUser") == 0:
        problems.append("pod runAsUser is 0")
    pod_seccomp = pod_ctx.get("seccompProfile", {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        problems.append(f"pod seccompProfile {pod_seccomp}")
    for container in _all_containers(spec):
        name, ctx = container["name"], container.get("securityContext", {})
        caps = ctx.get("capabilities", {})
        if ctx.get("privileged"):
            problems.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot must be true (pod or container)")
        if ctx.get("runAsUser") == 0:
            problems.append(f"{name}: runAsUser is 0")
        if ctx.get("seccompProfile", {}).get("type", pod_seccomp) not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost (pod or container)")
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {sorted(set(caps.get('add', [])) - {'NET_BIND_SERVICE'})}")
        if set(caps.get("add", [])) - BASELINE_CAPABILITIES:
            problems.append(f"{name}: adds capabilities outside baseline")
        if ctx.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount {ctx['procMount']}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
        if ctx.get("appArmorProfile", {}).get("type") == "Unconfined":
            problems.append(f"{name}: AppArmor unconfined")
    return problems


def secret_derived(env: list[Mapping[str, Any]]) -> set[str]:
    """Names of the variables whose value comes from a Secret, directly or through `$(VAR)` references."""
    tainted: set[str] = set()
    for item in env:
        source = item.get("valueFrom", {})
        if "secretKeyRef" in source or any(ref in tainted for ref in _REF.findall(item.get("value", ""))):
            tainted.add(item["name"])
    return tainted


def _value_leaks(name: str, value: str, tainted: set[str], defined: set[str]) -> list[str]:
    problems = []
    for match in _URL_PASSWORD.finditer(value):
        password = match[1]
        ref = _REF.fullmatch(password)
        if password and not (ref and ref[1] in tainted):
            problems.append(f"env {name}: the password in {value!r} is not a Secret reference")
    if SECRET_NAME.search(name):
        pointer = name.endswith(("_ENV", "_FILE", "_PATH")) and (
            value in defined or value.startswith("/") or _IDENTIFIER.match(value)
        )
        refs = _REF.findall(value)
        framed = _FRAMING.match(_REF.sub("", value))
        if not pointer and not (refs and all(r in tainted for r in refs) and framed):
            problems.append(f"env {name}: a secret-holding value that is not built from Secret references: {value!r}")
    return problems


def _command_leaks(where: str, parts: list[str], tainted: set[str]) -> list[str]:
    problems = []
    for i, part in enumerate(parts):
        used = [r for r in _REF.findall(part) if r in tainted]
        if used:
            problems.append(f"{where}: {part!r} puts Secret-derived {used} on a command line")
        if _URL_PASSWORD.search(part) and _URL_PASSWORD.search(part)[1]:
            problems.append(f"{where}: {part!r} holds a URL with a password")
        if _SECRET_FLAG.match(part):
            value = part.split("=", 1)[1] if "=" in part else (parts[i + 1] if i + 1 < len(parts) else "")
            if value and not value.startswith("-"):
                problems.append(f"{where}: {part!r} passes a secret as an argument")
    return problems


def secret_leaks(template: kube.PodTemplate) -> list[str]:
    """Places in a pod template where a secret is a literal or reaches a command line."""
    problems = []
    for container in _all_containers(template.spec):
        where = f"{template.where}/{container['name']}"
        env = container.get("env", [])
        tainted = secret_derived(env)
        defined = {item["name"] for item in env}
        for item in env:
            if "value" in item:
                problems += [f"{where}: {p}" for p in _value_leaks(item["name"], str(item["value"]), tainted, defined)]
        problems += _command_leaks(where, [*container.get("command", []), *container.get("args", [])], tainted)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            problems += _command_leaks(
                f"{where} {probe}", container.get(probe, {}).get("exec", {}).get("command", []), tainted
            )
        for hook in ("postStart", "preStop"):
            problems += _command_leaks(
                f"{where} {hook}",
                container.get("lifecycle", {}).get(hook, {}).get("exec", {}).get("command", []),
                tainted,
            )
    return problems
