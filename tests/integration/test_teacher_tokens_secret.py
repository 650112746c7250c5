"""Teams without restarts, the way Kubernetes does it: the teacher of the rendered manifest reads its tokens file
where the Secret opd-teacher-tokens is mounted, the file comes from docs/deploy.md's command, and the kubelet's
update of the mounted Secret (an atomic swap of the `..data` symlink) reaches the running teacher.

The mount is reproduced under a temporary root with the kubelet's layout (`tokens.yaml -> ..data/tokens.yaml`,
`..data -> ..<timestamp>/`); the Secret's content is what `kubectl create secret ... --dry-run=client -o yaml`
(the runbook's command, run here offline) produces.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from teacher_server.client import TeacherClientSync, Unauthenticated
from tests.deploy import kube
from tests.fixtures.teacher import start_teacher

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        kube.kubectl() is None, reason="kubectl is not installed (renders the manifest, runs the docs' command)"
    ),
]

DOCS = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"


def _docs_command() -> list[str]:
    """The runbook's `kubectl ... create secret generic opd-teacher-tokens ... | kubectl apply -f -`, client side."""
    lines = [
        line.strip()
        for line in DOCS.read_text().splitlines()
        if "create secret generic opd-teacher-tokens" in line and "| kubectl apply -f -" in line
    ]
    commands = {line.split("|")[0].replace(" -n NS ", " -n opd ") for line in lines}
    assert len(commands) == 1, f"the runbook writes the tokens Secret one way everywhere: {commands}"
    create = shlex.split(commands.pop())
    assert "--dry-run=client" in create and "-o" in create, "the runbook renders the Secret on the client"
    return [kube.kubectl() if part == "kubectl" else part for part in create]


def _secret_file(workdir: Path, tokens: dict[str, str]) -> bytes:
    (workdir / "tokens.yaml").write_text(yaml.safe_dump(tokens))
    out = subprocess.run(_docs_command(), cwd=workdir, capture_output=True, text=True, timeout=60, check=True)
    secret = yaml.safe_load(out.stdout)
    assert secret["metadata"]["name"] == "opd-teacher-tokens"
    return base64.b64decode(secret["data"]["tokens.yaml"])


def _teacher_mount() -> tuple[str, str, str]:
    """(tokens file path, mount path, file name in the mount) of the rendered teacher."""
    objects = kube.render(kube.K8S / "base")
    (template,) = [t for t in kube.pod_templates(objects) if t.where == "Deployment/opd-teacher"]
    (container,) = template.containers()
    path = kube.container_env(container)["OPD_TEACHER__AUTH__TOKENS_FILE"]
    volume, mount = kube.mount_for(template, container, path)
    assert volume["secret"]["secretName"] == "opd-teacher-tokens" and "subPath" not in mount, "a subPath never updates"
    (item,) = volume["secret"]["items"]
    assert mount["mountPath"] + "/" + item["path"] == path and item["key"] == "tokens.yaml"
    return path, mount["mountPath"], item["path"]


class KubeletSecretVolume:
    """A Secret volume as the kubelet's AtomicWriter keeps it: every update a new directory, swapped in at once."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory, self.name, self.version = directory, name, 0
        directory.mkdir(parents=True)
        (directory / name).symlink_to(f"..data/{name}")

    def update(self, content: bytes) -> None:
        self.version += 1
        payload = self.directory / f"..2026_12_07_{self.version:04d}"
        payload.mkdir()
        (payload / self.name).write_bytes(content)
        (self.directory / "..data_tmp").symlink_to(payload.name)
        os.replace(self.directory / "..data_tmp", self.directory / "..data")


def _score(address: str, token: str) -> None:
    with TeacherClientSync(address, token=token, timeout_s=30) as client:
        client.score(np.arange(1, 9), 3)


def _refused(address: str, token: str) -> None:
    try:
        _score(address, token)
    except Unauthenticated:
        return
    raise AssertionError("the token is still accepted")


def _poll(check, what: str, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            check()
            return
        except Exception as exc:  # re-raised with context at the deadline
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still failing after {deadline_s:.0f} s") from exc
        time.sleep(0.2)


def test_adding_rotating_and_revoking_a_team_through_the_mounted_secret(tiny_model_dir, tmp_path):
    path, mount_path, name = _teacher_mount()
    root = tmp_path / "root"
    volume = KubeletSecretVolume(root / mount_path.lstrip("/"), name)
    volume.update(_secret_file(tmp_path, {"student-a": "token-a-1"}))
    server = start_teacher(tiny_model_dir, "hf", auth={"tokens_file": str(root / path.lstrip("/"))})
    try:
        _score(server.address, "token-a-1")
        with pytest.raises(Unauthenticated):
            _score(server.address, "token-b-1")
        # "Add a team" and "rotate a token" (docs/deploy.md): the edited file, through the same command.
        volume.update(_secret_file(tmp_path, {"student-a": "token-a-2", "student-b": "token-b-1"}))
        _poll(lambda: _score(server.address, "token-b-1"), "the new team's token")
        _score(server.address, "token-a-2")
        with pytest.raises(Unauthenticated):
            _score(server.address, "token-a-1")  # the rotated-out token
        # Revoking a team: its line removed.
        volume.update(_secret_file(tmp_path, {"student-a": "token-a-2"}))
        _poll(lambda: _refused(server.address, "token-b-1"), "the revoked team")
    finally:
        server.stop()
    assert re.fullmatch(r"/etc/opd/secrets/auth/tokens\.yaml", path)
