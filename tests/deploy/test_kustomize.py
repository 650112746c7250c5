"""Kubernetes manifests: every kustomize tree renders, validates against the Kubernetes 1.32 API, and is wired right.

Offline: `kubectl kustomize` renders (skipped, with the reason, where kubectl is absent), kubernetes-validate
checks every core object against its bundled 1.32 schemas (strict: unknown fields fail), and the custom resources
(prometheus-operator PodMonitor, KubeRay RayCluster, JobSet, Kueue LocalQueue) are validated with a JSON-schema
validator against trimmed copies of their real CRD schemas, of the oldest supported and the newest checked release
(tests/deploy/crds, crd_check.py), plus the admission rules JobSet's webhook and KubeRay enforce in code. Every
opd container's command line is parsed by the component's own config loader, and the tests follow what the
processes would do with it: which Service and port they connect to, which port they listen on, which volume holds
the paths they read and write. Network policies: test_k8s_network.py; pod security, secrets and Redis:
test_k8s_security.py; the trainer's JobSet, Kueue and preset edits: test_k8s_trainer.py.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import kubernetes_validate
import pytest

from tests.deploy import crd_check, kube
from tests.deploy.commands import REPO, parse_container, redis_endpoint, split_host_port

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        kube.kubectl() is None,
        reason="kubectl (with kustomize) is not on PATH: the kustomize trees cannot be rendered here",
    ),
]

TREE_IDS = [tree_id for tree_id, _ in kube.TREES]
CUSTOM_KINDS = crd_check.kinds()


def objects(tree_id: str):
    """The tree's objects and those of its long-lived bundle (applied once beside it)."""
    return kube.render(dict(kube.TREES)[tree_id]) + kube.render(kube.BUNDLES[tree_id])


@functools.cache
def opd_processes(tree_id: str) -> list[tuple[kube.PodTemplate, dict, dict, object]]:
    """(pod template, container, env, parsed command) of every container that runs an opd component."""
    out = []
    for template in kube.pod_templates(objects(tree_id)):
        if template.owner["kind"] == "RayCluster":
            continue  # KubeRay supplies the command (`ray start`); the actors' config comes from the driver
        for container in template.containers():
            if not container["image"].split(":")[0].endswith("opd"):
                continue
            env = kube.container_env(container)
            command, args = kube.command_line(container, env)
            out.append((template, container, env, parse_container(command or ["opd"], args, env)))
    return out


def processes(tree_id: str, component: str):
    return [p for p in opd_processes(tree_id) if p[3].component == component]


# ---------------------------------------------------------------------------------------------- render + schemas


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_tree_renders_with_unique_namespaced_objects(tree_id):
    rendered = objects(tree_id)
    keys = [(o["kind"], o["metadata"]["name"]) for o in rendered]
    assert len(keys) == len(set(keys)), f"duplicate objects: {sorted(k for k in keys if keys.count(k) > 1)}"
    if tree_id != "base":
        (namespace,) = kube.find(rendered, "Namespace")
        for obj in rendered:
            if obj["kind"] not in ("Namespace", "PriorityClass"):  # cluster-scoped
                assert obj["metadata"].get("namespace") == namespace["metadata"]["name"], obj["metadata"]["name"]


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_core_objects_validate_against_the_kubernetes_api(tree_id):
    failures = []
    for obj in objects(tree_id):
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(copy.deepcopy(obj), kube.KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert failures == []


def test_the_api_validation_rejects_unknown_fields_and_wrong_types():
    deployment = copy.deepcopy(kube.one(objects("cpu-demo"), "Deployment", "opd-teacher"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"]["httpGet"]["path"] = 42  # a path is a string
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kube.KUBERNETES_VERSION, strict=True)
    del container["livenessProbe"]
    container["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kube.KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_custom_resources_validate_against_their_crds(tree_id):
    custom = [o for o in objects(tree_id) if o["kind"] in CUSTOM_KINDS]
    assert custom or tree_id == "base", "the overlays hold custom resources"
    assert [p for obj in custom for p in crd_check.problems(obj)] == []


def test_every_vendored_crd_names_its_source_and_licence():
    by_kind: dict[str, list[str]] = {}
    for crd in crd_check.vendored():
        header = (crd_check.CRDS / crd.file).read_text().split("\nsource:")[0]
        assert crd.source["repo"] in header and crd.source["commit"] in header and "Apache-2.0" in header, crd.file
        assert re.fullmatch(r"[0-9a-f]{40}", crd.source["commit"]) and crd.source["path"].endswith(".yaml"), crd.file
        by_kind.setdefault(crd.kind, []).append(crd.source["tag"])
    assert set(by_kind) == {
        "JobSet",
        "RayCluster",
        "LocalQueue",
        "PodMonitor",
        "PrometheusRule",
        "Issuer",
        "Certificate",
    }
    documented = (REPO / "docs" / "deploy.md").read_text()
    for kind, tags in by_kind.items():
        for tag in tags:
            assert tag in documented, (
                f"docs/deploy.md does not name {kind} {tag}, which the manifests are checked against"
            )


def _mutated(tree_id: str, kind: str, name: str, edit) -> dict:
    obj = copy.deepcopy(kube.one(objects(tree_id), kind, name))
    edit(obj["spec"])
    return obj


def _set(path: str, value):
    """An edit that sets spec.<path> (dots; digits index lists) to value."""

    def edit(spec):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in parents:
            spec = spec[key]
        spec[last] = value

    return edit


_POD_MONITOR = ("gpu-overlay", "PodMonitor", "opd-teacher")
_RAY = ("ray-overlay", "RayCluster", "opd-rollout-ray")
_JOBSET = ("gpu-overlay", "JobSet", "opd-trainer")
# (what is wrong, the object, the edit, a fragment every problem names); schema cases fail under every vendored
# release of the kind, admission cases once.
SCHEMA_CASES = [
    ("a field the CRD lacks", _POD_MONITOR, _set("podMetricsEndpoints.0.targetPortName", "ops"), "targetPortName"),
    ("a wrong type in a map", _RAY, _set("workerGroupSpecs.0.rayStartParams.num-gpus", 1), "rayStartParams"),
    ("an enumeration is case-sensitive", _RAY, _set("authOptions.mode", "Token"), "authOptions.mode"),
    ("an unknown failure action", _JOBSET, _set("failurePolicy.rules.0.action", "Restart"), "action"),
    ("an integer as a string", _JOBSET, _set("failurePolicy.maxRestarts", "10"), "maxRestarts"),
    ("a required field", _RAY, lambda spec: spec.pop("headGroupSpec"), "headGroupSpec"),
    ("a misspelled pod field", _RAY, _set("headGroupSpec.template.spec.containers.0.resource", {}), "resource"),
    ("a misspelled Job field", _JOBSET, _set("replicatedJobs.0.template.spec.backoffLimt", 0), "backoffLimt"),
    ("a real field not vendored", _JOBSET, _set("ttlSecondsAfterFinished", 600), "re-vendor"),
]
ADMISSION_CASES = [
    ("JobSet rule names allow no hyphen", _JOBSET, _set("failurePolicy.rules.0.name", "restart-all"), "restart-all"),
    ("an unknown Job failure reason", _JOBSET, _set("failurePolicy.rules.0.onJobFailureReasons", ["OOMKilled"]), "OOM"),
    ("token auth needs Ray 2.52", _RAY, _set("rayVersion", "2.51.0"), "2.52.0"),
]


@pytest.mark.parametrize(("what", "target", "edit", "fragment"), SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_the_crd_check_rejects_what_the_api_server_would(what, target, edit, fragment):
    obj = _mutated(*target, edit)
    problems = crd_check.problems(obj)
    assert len(problems) == len(crd_check.for_kind(obj["kind"])), problems
    assert all(fragment in p for p in problems), problems


@pytest.mark.parametrize(("what", "target", "edit", "fragment"), ADMISSION_CASES, ids=[c[0] for c in ADMISSION_CASES])
def test_the_crd_check_applies_the_controllers_admission_rules(what, target, edit, fragment):
    problems = crd_check.problems(_mutated(*target, edit))
    assert len(problems) == 1 and fragment in problems[0], problems


def test_a_custom_resource_of_another_api_version_is_refused():
    queue = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue", "metadata": {"name": "q"}, "spec": {}}
    assert all("apiVersion" in p for p in crd_check.problems(queue)) and crd_check.problems(queue)


# ---------------------------------------------------------------------------------------------- references


def _documented_secrets() -> set[str]:
    text = (kube.K8S / "base" / "kustomization.yaml").read_text()
    return set(re.findall(r"^#   (opd-[a-z-]+) ", text, re.M))


def _kuberay_token_secrets(rendered) -> set[str]:
    """Secrets KubeRay generates: one per RayCluster with token authentication, named after the cluster."""
    return {
        c["metadata"]["name"]
        for c in kube.find(rendered, "RayCluster")
        if c["spec"].get("authOptions", {}).get("mode") == "token"
    }


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_references_resolve_to_rendered_objects_or_the_documented_secret(tree_id):
    rendered = objects(tree_id)
    names = {(o["kind"], o["metadata"]["name"]) for o in rendered}
    for template in kube.pod_templates(rendered):
        spec = template.spec
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in names, template.where
        claim_templates = {c["metadata"]["name"] for c in template.owner["spec"].get("volumeClaimTemplates", [])}
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, f"{template.where}: {volume}"
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names, template.where
            if "secret" in volume:
                name, keys = volume["secret"]["secretName"], kube.EXTERNAL_SECRETS.get(volume["secret"]["secretName"])
                assert name in kube.EXTERNAL_SECRETS and name in _documented_secrets(), f"{template.where}: {name}"
                items = {item["key"] for item in volume["secret"].get("items", [])}
                assert keys is None or items <= keys, f"{template.where}: {name} has no keys {items - keys}"
        for container in template.containers(init=True):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] in _kuberay_token_secrets(rendered):
                    assert ref["key"] == "auth_token", f"{template.where}: KubeRay's token secret has key auth_token"
                else:
                    assert not ref, f"{template.where}: opd's secrets are mounted files, not env ({ref})"
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            declared = {v["name"] for v in spec.get("volumes", [])} | claim_templates
            assert mounts <= declared, f"{template.where}/{container['name']}: undeclared volumes"
    for binding in kube.find(rendered, "RoleBinding"):
        assert ("Role", binding["roleRef"]["name"]) in names
        for subject in binding["subjects"]:
            assert ("ServiceAccount", subject["name"]) in names


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_services_select_pods_that_expose_their_target_ports(tree_id):
    rendered = objects(tree_id)
    templates = list(kube.pod_templates(rendered))
    for service in kube.find(rendered, "Service"):
        selected = [t for t in templates if kube.selects(service["spec"]["selector"], t.labels)]
        assert selected, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for template in selected:
                numbers = {
                    kube.container_port(c, target) if isinstance(target, str) else target for c in template.containers()
                }
                assert numbers - {None}, f"{service['metadata']['name']}: {template.where} has no port {target}"


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_presets_configmaps_hold_the_repository_presets(tree_id):
    configmaps = kube.find(objects(tree_id), "ConfigMap")
    (teacher,) = [c for c in configmaps if c["metadata"]["name"].startswith("opd-presets-")]
    (rollout,) = [c for c in configmaps if c["metadata"]["name"].startswith("opd-rollout-presets-")]
    (trainer,) = [c for c in configmaps if c["metadata"]["name"] == "opd-trainer-presets"]
    presets = {p.name: p.read_text() for p in (REPO / "deploy" / "presets").glob("*.yaml")}
    for configmap, prefix in ((teacher, "teacher-"), (rollout, "rollout-"), (trainer, "train-")):
        expected = {name: text for name, text in presets.items() if name.startswith(prefix)}
        assert configmap["data"] == expected, (
            f"{configmap['metadata']['name']}: the presets copies in deploy/k8s or their configMapGenerator "
            "differ from deploy/presets"
        )


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_redis_configmap_holds_the_repository_redis_conf(tree_id):
    (configmap,) = [
        c for c in kube.find(objects(tree_id), "ConfigMap") if c["metadata"]["name"].startswith("opd-redis-config-")
    ]
    assert configmap["data"] == {"redis.conf": (REPO / "deploy" / "redis" / "redis.conf").read_text()}


# ---------------------------------------------------------------------------------------------- opd containers


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_every_opd_container_runs_a_real_command(tree_id):
    found = {parsed.component for _, _, _, parsed in opd_processes(tree_id)}
    assert found == {"teacher", "rollout", "train"}, found


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_opd_images_are_pinned_and_one_per_tree(tree_id):
    images = {
        c["image"]
        for t in kube.pod_templates(objects(tree_id))
        for c in t.containers(init=True)
        if c["image"].split(":")[0].endswith("opd")
    }
    if tree_id == "base":
        assert images == {"opd"}, "the base leaves the tag to the overlays"
        return
    assert len(images) == 1, images
    tag = images.pop().rsplit(":", 1)[1]
    assert tag.endswith("-cpu" if tree_id == "cpu-demo" else "-cuda"), tag


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_pods_run_as_non_root(tree_id):
    for template in kube.pod_templates(objects(tree_id)):
        pod = template.spec.get("securityContext", {})
        for container in template.containers(init=True):
            ctx = container.get("securityContext", {})
            assert ctx.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, f"{template.where}/{container['name']}"
            assert ctx.get("privileged") is not True


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_ops_ports_probes_and_scrape_annotations_match_the_parsed_config(tree_id):
    for template, container, _, parsed in opd_processes(tree_id):
        config, where = parsed.config, template.where
        if parsed.component == "rollout" and config.ray:
            assert "prometheus.io/scrape" not in template.annotations, "the Ray driver serves no ops port"
            continue  # the actors serve theirs on the Ray worker pods (test_ray_overlay_runs_the_fleet_...)
        ops = config.ops_port() if parsed.component == "rollout" else config.ops.port
        assert kube.container_port(container, "ops") == ops, f"{where}: containerPort ops != {ops}"
        assert template.annotations["prometheus.io/scrape"] == "true"
        assert int(template.annotations["prometheus.io/port"]) == ops, where
        assert template.annotations.get("prometheus.io/path", "/metrics") == "/metrics"
        if parsed.component == "teacher":
            assert kube.container_port(container, "grpc") == config.grpc.port
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # gRPC probes cannot speak TLS
                assert container[probe]["httpGet"]["port"] in ("ops", ops), f"{where}: {probe}"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # follows gRPC health
            assert template.spec["terminationGracePeriodSeconds"] > config.grpc.drain_grace_s
        if parsed.component == "rollout":
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["httpGet"]["port"] in ("ops", ops), f"{where}: {probe}"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert template.spec["terminationGracePeriodSeconds"] > config.drain_grace_s


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_trainer_jobset_launches_one_torchrun_node_per_index(tree_id):
    rendered = objects(tree_id)
    (trainer,) = processes(tree_id, "train")
    template, container, _, parsed = trainer
    jobset, job = template.owner, template.job_spec
    run = parsed.torchrun
    assert jobset["kind"] == "JobSet" and template.replicated_job["replicas"] == 1, "one Job, one pod per node"
    assert job["completionMode"] == "Indexed"
    assert int(run.nnodes) == job["completions"] == job["parallelism"], (
        "keep completions, parallelism and OPD_NNODES equal"
    )
    rank_env = [
        e
        for e in container["env"]
        if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == kube.JOB_INDEX_FIELD
    ]
    assert rank_env and f"--node-rank=$({rank_env[0]['name']})" in container["args"], "node rank = completion index"
    network = jobset["spec"]["network"]
    master_pod, _, subdomain = run.master_addr.partition(".")
    assert network["enableDNSHostnames"] is True and subdomain == network["subdomain"]
    assert master_pod == template.hostname(index=0), "rank 0's pod hosts the rendezvous"
    service = kube.one(rendered, "Service", subdomain)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert kube.selects(service["spec"]["selector"], template.pod_labels())
    assert int(run.master_port) in {p["port"] for p in service["spec"]["ports"]}
    assert kube.container_port(container, "rendezvous") == int(run.master_port)
    gpus = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    assert gpus in (0, int(run.nproc_per_node)), "one process per GPU of the pod"
    assert parsed.config.checkpoint.resume, "a restarted group must resume from the checkpoint"


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_trainers_reach_the_teacher_service_over_tls_with_their_own_token(tree_id):
    rendered = objects(tree_id)
    (teacher,) = processes(tree_id, "teacher")
    t_template, t_container, _, t_parsed = teacher
    grpc = t_parsed.config.grpc
    assert kube.secret_file(t_template, t_container, t_parsed.config.auth.tokens_file) == (
        "opd-teacher-tokens",
        "tokens.yaml",
    ), "the teacher reads its teams from the Secret opd-teacher-tokens (re-read on change)"
    assert kube.secret_file(t_template, t_container, grpc.tls_cert_file) == ("opd-teacher-tls", "tls.crt")
    assert kube.secret_file(t_template, t_container, grpc.tls_key_file) == ("opd-teacher-tls", "tls.key")
    for r_template, r_container, _, trainer in processes(tree_id, "train"):
        teacher_config = trainer.config.teacher
        assert teacher_config.token is None and teacher_config.token_file, "the token comes from a file"
        name = trainer.config.redis.namespace
        assert kube.secret_file(r_template, r_container, teacher_config.token_file) == ("opd-student-tokens", name)
        assert teacher_config.client_name == name
        assert kube.secret_file(r_template, r_container, teacher_config.tls_ca_file) == ("opd-teacher-tls", "ca.crt")
        for address in trainer.config.teacher.addresses:
            assert address.startswith("dns:///"), f"{address}: use dns:/// so clients balance across replicas"
            host, port = split_host_port(address)
            service = kube.one(rendered, "Service", host)
            assert service["spec"]["clusterIP"] == "None", f"{host} must be headless (one address per replica)"
            assert kube.selects(service["spec"]["selector"], t_template.labels)
            assert port == grpc.port and port in {p["port"] for p in service["spec"]["ports"]}
            assert host in _opd_certs_teacher_names(), f"`opd certs` must put {host} in the teacher's certificate"


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_redis_clients_use_the_redis_service_password_and_one_namespace(tree_id):
    rendered = objects(tree_id)
    statefulset = kube.one(rendered, "StatefulSet", "opd-redis")
    redis_pod = next(t for t in kube.pod_templates(rendered) if t.owner is statefulset)
    redis = statefulset["spec"]["template"]["spec"]["containers"][0]
    server_file = re.search(r"cat (\S+)\)", redis["command"][-1])[1]  # written into auth.conf (test_k8s_security)
    assert kube.secret_file(redis_pod, redis, server_file) == ("opd-redis", "password")
    namespaces = set()
    for template, container, _, parsed in processes(tree_id, "rollout") + processes(tree_id, "train"):
        host, port, url_password = redis_endpoint(parsed.config.redis.url)
        service = kube.one(rendered, "Service", host)
        assert kube.selects(service["spec"]["selector"], statefulset["spec"]["template"]["metadata"]["labels"])
        assert port == kube.container_port(redis, "redis") and url_password is None, "no password in the URL"
        password_file = parsed.config.redis.password_file
        assert kube.secret_file(template, container, password_file) == ("opd-redis", "password"), template.where
        namespaces.add(parsed.config.redis.namespace)
    assert len(namespaces) == 1, f"trainer and rollout workers must share one Redis namespace: {namespaces}"


def _opd_certs_teacher_names() -> tuple[str, ...]:
    from opd.certs import DEFAULT_TEACHER_NAMES

    return DEFAULT_TEACHER_NAMES


def _rollout_pods(tree_id: str) -> list[tuple[kube.PodTemplate, dict]]:
    """Pods that run rollout workers: the rollout Deployment's, or the RayCluster's worker groups."""
    pods = [(t, c) for t, c, _, p in processes(tree_id, "rollout") if not p.config.ray]
    for template in kube.pod_templates(objects(tree_id)):
        if template.owner["kind"] == "RayCluster" and not template.where.endswith("/head"):
            pods += [(template, c) for c in template.containers()]
    return pods


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_paths_the_components_use_are_on_the_right_volumes(tree_id):
    (trainer,) = processes(tree_id, "train")
    t_template, t_container, _, t_parsed = trainer
    config = t_parsed.config
    publish = kube.mount_for(t_template, t_container, config.publish.uri)
    checkpoint = kube.mount_for(t_template, t_container, config.checkpoint.dir)
    for found, what in ((publish, "publish.uri"), (checkpoint, "checkpoint.dir")):
        assert found and "persistentVolumeClaim" in found[0] and not found[1].get("readOnly"), (
            f"trainer {what} must be on a writable PVC"
        )
    weights = kube.volume_source(*publish)
    for template, container in _rollout_pods(tree_id):
        seen = kube.mount_for(template, container, config.publish.uri)
        assert seen and kube.volume_source(*seen) == weights, f"{template.where} cannot read the published weights"
        assert seen[1]["mountPath"] == publish[1]["mountPath"], "weights must appear at the announced path"
    data_paths = [p for p in (config.data.prompts, config.data.eval_prompts) if p]
    for path in data_paths + [config.model]:
        assert path.startswith("/opt/opd/data/") or kube.mount_for(t_template, t_container, path), (
            f"trainer path {path} is neither in the image nor on a volume"
        )
    for template, container, _, parsed in opd_processes(tree_id):
        model = parsed.config.model
        if parsed.component == "rollout" and parsed.config.ray:  # the actors load the model on the Ray workers
            for worker, worker_container in _rollout_pods(tree_id):
                assert kube.mount_for(worker, worker_container, model), f"{worker.where}: {model} not mounted"
            continue
        assert model == "embedded" or kube.mount_for(template, container, model), f"{template.where}: {model}"


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_podmonitors_scrape_the_ops_ports_of_the_pods_they_select(tree_id):
    rendered = objects(tree_id)
    templates = list(kube.pod_templates(rendered))
    monitored = set()
    for monitor in kube.find(rendered, "PodMonitor"):
        selected = [t for t in templates if kube.selects(monitor["spec"]["selector"], t.pod_labels())]
        assert selected, f"PodMonitor {monitor['metadata']['name']} selects no pod"
        for template in selected:  # other trainer ranks serve no ops port: never scraped
            assert template.job_spec is None or not kube.selects(
                monitor["spec"]["selector"], template.pod_labels(index=1)
            )
        assert monitor["spec"]["podMetricsEndpoints"], monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint.get("path", "/metrics") == "/metrics"
            for template in selected:
                assert any(kube.container_port(c, endpoint["port"]) for c in template.containers()), (
                    f"{monitor['metadata']['name']}: {template.where} has no port {endpoint['port']}"
                )
                monitored.add(template.where)
    if kube.find(rendered, "PodMonitor"):
        for template, _, _, parsed in opd_processes(tree_id):
            if not (parsed.component == "rollout" and parsed.config.ray):
                assert template.where in monitored, f"{template.where} has no PodMonitor"
        (trainer_monitor,) = [m for m in kube.find(rendered, "PodMonitor") if m["metadata"]["name"] == "opd-trainer"]
        assert trainer_monitor["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/job-completion-index"] == "0"


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_podmonitors_carry_the_prometheus_selector_label_and_the_student_job(tree_id):
    rendered = objects(tree_id)
    monitors = kube.find(rendered, "PodMonitor")
    releases = {m["metadata"]["labels"].get("release") for m in monitors}
    assert not monitors or releases == {"kube-prometheus-stack"}, (
        f"every PodMonitor needs kube-prometheus-stack's selector label (release), set once per overlay: {releases}"
    )
    templates = list(kube.pod_templates(rendered))
    for monitor in monitors:
        spec = monitor["spec"]
        assert spec["jobLabel"] == "app.kubernetes.io/instance", "job = the student (dashboard variable)"
        assert "app.kubernetes.io/component" in spec["podTargetLabels"]
        for template in templates:
            if kube.selects(spec["selector"], template.pod_labels()):
                assert template.labels.get(spec["jobLabel"]), f"{template.where} lacks the job label {spec['jobLabel']}"
    students = {
        p[0].labels["app.kubernetes.io/instance"] for p in opd_processes(tree_id) if p[3].component != "teacher"
    }
    namespaces = {p[3].config.redis.namespace for p in opd_processes(tree_id) if p[3].component != "teacher"}
    assert students == namespaces, "a student's pods are labelled with its name (= its Redis namespace)"


def test_ray_overlay_runs_the_fleet_on_the_raycluster():
    rendered = objects("ray-overlay")
    assert not kube.find(rendered, "Deployment", "opd-rollout"), "the ray overlay replaces the rollout Deployment"
    (driver,) = processes("ray-overlay", "rollout")
    config = driver[3].config
    cluster = kube.one(rendered, "RayCluster", "opd-rollout-ray")
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    assert cluster["spec"]["rayVersion"] == re.search(r"ARG RAY_VERSION=(\S+)", dockerfile)[1]
    assert config.ray == f"ray://{cluster['metadata']['name']}-head-svc:10001"
    head = cluster["spec"]["headGroupSpec"]
    assert kube.container_port(head["template"]["spec"]["containers"][0], "client") == 10001
    assert head["rayStartParams"].get("num-cpus") == "0", "no actor on the head"
    gpus = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in cluster["spec"]["workerGroupSpecs"]
    )
    assert gpus >= config.workers * config.ray_num_gpus, f"{config.workers} actors need more GPUs than {gpus}"


def test_ray_metrics_are_scraped_on_the_metrics_port_of_every_ray_pod():
    """KubeRay's way: one endpoint, port `metrics` (metrics-export-port) on the head and every worker."""
    rendered = objects("ray-overlay")
    cluster = kube.one(rendered, "RayCluster", "opd-rollout-ray")
    (monitor,) = [m for m in kube.find(rendered, "PodMonitor") if m["metadata"]["name"] == "opd-rollout-ray"]
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert "ray.io/cluster" in monitor["spec"]["podTargetLabels"], "Ray's dashboards filter on ray_io_cluster"
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    ray_pods = [t for t in kube.pod_templates(rendered) if t.owner is cluster]
    assert len(ray_pods) == len(groups)
    for group, template in zip(groups, ray_pods, strict=True):
        (container,) = template.containers()
        port = kube.container_port(container, "metrics")
        assert port == int(group["rayStartParams"]["metrics-export-port"]), template.where
        assert kube.selects(monitor["spec"]["selector"], template.pod_labels()), f"{template.where} is not scraped"


# ---------------------------------------------------------------------------------------------- copies


def _preset_copy(preset: Path) -> Path:
    return kube.K8S / ("base" if preset.name.startswith("teacher-") else "student") / "presets" / preset.name


COPIES = [(_preset_copy(p), p) for p in sorted((REPO / "deploy" / "presets").glob("*.yaml"))] + [
    (kube.K8S / "base" / "redis" / "redis.conf", REPO / "deploy" / "redis" / "redis.conf"),
    (kube.K8S / "components" / "dashboard" / "opd.json", REPO / "deploy" / "grafana" / "dashboards" / "opd.json"),
    (
        kube.K8S / "components" / "prometheus-grafana" / "prometheus.yml",
        REPO / "deploy" / "prometheus" / "prometheus-kubernetes.yml",
    ),
    (
        kube.K8S / "components" / "prometheus-grafana" / "datasource.yml",
        REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "opd.yml",
    ),
    (
        kube.K8S / "components" / "prometheus-grafana" / "dashboard-provider.yml",
        REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "opd.yml",
    ),
]


@pytest.mark.parametrize(("copy_path", "original"), COPIES, ids=[c.name for c, _ in COPIES])
def test_kustomize_copies_equal_their_originals(copy_path, original):
    assert copy_path.is_file(), f"missing {copy_path}: copy {original} there (kustomize reads files under its root)"
    assert copy_path.read_bytes() == original.read_bytes(), f"{copy_path} differs from {original}: copy it again"


def test_every_kustomize_copy_is_checked():
    under_k8s = {p for d in ("base", "student") for p in (kube.K8S / d / "presets").glob("*")}
    assert under_k8s == {c for c, _ in COPIES if c.parent.name == "presets"}, "a preset copy has no original"


# ---------------------------------------------------------------------------------------------- long-lived objects


@pytest.mark.parametrize("tree_id", TREE_IDS)
def test_deleting_a_tree_cannot_delete_data_or_cluster_objects(tree_id):
    """`kubectl delete -k` of a tree (or of a student) deletes what it renders: no Namespace, PVC or PriorityClass
    may be among them; they come from the tree's bundle, applied once."""
    trees = [dict(kube.TREES)[tree_id], kube.K8S / "students" / "student-b"]
    for tree in trees:
        held = [f"{o['kind']}/{o['metadata']['name']}" for o in kube.render(tree) if o["kind"] in kube.LONG_LIVED_KINDS]
        assert held == [], f"{tree.relative_to(REPO)} holds {held}: move them to its cluster/ bundle"
    bundle = kube.render(kube.BUNDLES[tree_id])
    assert {o["kind"] for o in bundle} <= kube.LONG_LIVED_KINDS, "the bundle holds only long-lived objects"
    assert {"PriorityClass", "PersistentVolumeClaim"} <= {o["kind"] for o in bundle}
    assert tree_id == "base" or kube.find(bundle, "Namespace")
