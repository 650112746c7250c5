"""Prometheus and Grafana files: the scrape targets are the ports the components listen on, and every metric the
dashboard queries is one the code exports.

The metric names come from the components' own registries (TeacherMetrics, RolloutMetrics, TrainerMetrics), with
the series names Prometheus sees (`_total` for counters, `_bucket`/`_sum`/`_count` for histograms). Ports come
from the config classes' defaults, which is what the deployments run (their commands are checked not to change
them in test_compose / test_kustomize).
"""

from __future__ import annotations

import functools
import json
import re

import pytest
import yaml

from rollout_workers.config import RolloutOpsConfig as RolloutOps
from rollout_workers.metrics import RolloutMetrics
from student_trainer.config import TrainerOpsConfig as TrainerOps
from student_trainer.metrics import TrainerMetrics
from teacher_server.config import GrpcConfig as TeacherGrpc
from teacher_server.config import TeacherOpsConfig as TeacherOps
from teacher_server.metrics import TeacherMetrics
from tests.deploy import compose_project as cp
from tests.deploy.commands import REPO

pytestmark = pytest.mark.timeout(60)

PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "opd.json"
OPS_PORTS = {"teacher": TeacherOps().port, "rollout": RolloutOps().port, "trainer": TrainerOps().port}

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
}
PROMQL_FUNCTIONS = {
    "abs",
    "absent",
    "absent_over_time",
    "avg",
    "avg_over_time",
    "bottomk",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count",
    "count_over_time",
    "count_values",
    "delta",
    "deriv",
    "exp",
    "floor",
    "group",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_sum",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log2",
    "log10",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "predict_linear",
    "quantile",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev",
    "stddev_over_time",
    "stdvar",
    "sum",
    "sum_over_time",
    "time",
    "timestamp",
    "topk",
    "vector",
}
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


# Series of redis_exporter (the sidecar of opd-redis) that the dashboard and the alerts read.
REDIS_EXPORTER_SERIES = {
    "redis_memory_used_bytes",
    "redis_memory_max_bytes",
    "redis_connected_clients",
    "redis_commands_processed_total",
}


@functools.cache
def exported_series() -> frozenset[str]:
    """Every series name the three components' registries can expose, and redis_exporter's that opd reads."""
    names: set[str] = set(REDIS_EXPORTER_SERIES)
    for metrics in (TeacherMetrics(), RolloutMetrics(), TrainerMetrics()):
        for family in metrics.registry.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
            names.update(sample.name for sample in family.samples)
    return frozenset(names)


def metric_names(expr: str) -> list[str]:
    """Metric names in a PromQL expression (functions, keywords, labels, ranges and strings removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = []
    for match in re.finditer(r"(?<![A-Za-z0-9_:.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        token = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            assert token in PROMQL_FUNCTIONS or token in PROMQL_KEYWORDS, f"unknown PromQL function {token!r}"
        elif token.lower() not in PROMQL_KEYWORDS:
            names.append(token)
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"] for target in panel.get("targets", [])]


# ---------------------------------------------------------------------------------------------- dashboard


def test_metric_name_extraction_finds_the_metrics_and_nothing_else():
    expr = (
        "histogram_quantile(0.95, sum by (le, rpc) (rate(opd_teacher_request_latency_seconds_bucket"
        '{rpc="Score", client=~"a|b"}[$__rate_interval]))) / ignoring(x) group_left sum(up) * 1e-3'
    )
    assert metric_names(expr) == ["opd_teacher_request_latency_seconds_bucket", "up"]
    assert "opd_teacher_scored_tokens" not in exported_series()  # a counter is only seen with _total
    assert "opd_teacher_scored_tokens_total" in exported_series()
    assert "opd_rollout_dead_lettered_records_total" in exported_series()  # from the StreamStats collector


@pytest.mark.parametrize(("title", "expr"), queries(), ids=[f"{t}-{i}" for i, (t, _) in enumerate(queries())])
def test_dashboard_query_names_only_exported_metrics(title, expr):
    names = metric_names(expr)
    assert names, f"{title}: no metric in {expr!r}"
    unknown = [n for n in names if n not in exported_series()]
    assert not unknown, f"{title}: {unknown} are not exported by the teacher, rollout or trainer registries"


def test_dashboard_covers_the_signals_the_issue_asks_for():
    used = {name for _, expr in queries() for name in metric_names(expr)}
    wanted = {
        "opd_teacher_scored_tokens_total",  # teacher tokens/s (per client)
        "opd_teacher_request_latency_seconds_bucket",
        "opd_teacher_queue_wait_seconds_bucket",
        "opd_teacher_batch_size_tokens_sum",
        "opd_teacher_requests_total",
        "opd_rollout_rollouts_total",
        "opd_rollout_reward_sum",
        "opd_rollout_queue_depth_records",
        "opd_trainer_loss",
        "opd_trainer_divergence",
        "opd_trainer_step_time_seconds_sum",
        "opd_trainer_staleness_versions_sum",
        "redis_memory_used_bytes",  # against maxmemory (redis_exporter)
        "redis_memory_max_bytes",
    }
    assert wanted <= used, f"missing panels for {sorted(wanted - used)}"
    step_time = [expr for _, expr in queries() if "opd_trainer_step_time_seconds" in expr]
    assert any(re.search(r"by \([^)]*\bphase\b", expr) for expr in step_time), (
        "step time split by phase (data / teacher / compute)"
    )


def test_dashboard_is_well_formed_and_uses_its_datasource_variable():
    board = dashboard()
    assert board["uid"] and board["title"]
    (variable,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${" + variable["name"] + "}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]


# Teacher metrics that carry no client label describe the whole shared teacher (batching, queue, engine).
TEACHER_WIDE = (
    "opd_teacher_batch_size_",
    "opd_teacher_queue_depth_requests",
    "opd_teacher_inflight_batches",
    "opd_teacher_engine_busy_seconds_total",
    "opd_teacher_engine_ready",
)
_AGGREGATION = re.compile(
    r"\b(sum|avg|min|max|count|stddev|stdvar|topk|bottomk|quantile|group)\b"
    r"\s*(by|without)?\s*(\([^)]*\))?\s*\("
)


def student_problems(expr: str) -> list[str]:
    """Why a query could mix two students: a student metric not filtered by the student variables, or an
    aggregation that does not keep the student's labels apart."""
    problems = []
    names = set(metric_names(expr))
    student = any(n.startswith(("opd_rollout_", "opd_trainer_")) for n in names)
    client = any(n.startswith("opd_teacher_") and not n.startswith(TEACHER_WIDE) for n in names)
    keep = {"namespace", "job"} if student else {"namespace", "client"} if client else {"namespace"}
    for name in names:
        for match in re.finditer(r"(?<![A-Za-z0-9_:])" + re.escape(name) + r"(\{[^}]*\})?(?![A-Za-z0-9_:])", expr):
            selector = match[1] or ""
            if name.startswith(("opd_rollout_", "opd_trainer_")):
                if 'namespace=~"$namespace"' not in selector or 'job=~"$job"' not in selector:
                    problems.append(f'{name}: not filtered by namespace=~"$namespace" and job=~"$job"')
            elif (
                name.startswith("opd_teacher_")
                and not name.startswith(TEACHER_WIDE)
                and 'client=~"$job"' not in selector
            ):
                problems.append(f'{name}: not filtered by client=~"$job"')
    for match in _AGGREGATION.finditer(expr):
        if match[2] != "by":
            problems.append(f"{match[1]} without `by`: it sums students together")
            continue
        grouped = {label.strip() for label in match[3].strip("()").split(",")}
        if not keep <= grouped:
            problems.append(f"{match[1]} by {sorted(grouped)} drops {sorted(keep - grouped)}")
    return problems


def test_the_student_check_finds_mixed_students():
    assert (
        student_problems(
            'sum by (namespace, job) (rate(opd_trainer_rollouts_total{namespace=~"$namespace", job=~"$job"}[5m]))'
        )
        == []
    )
    assert student_problems('sum(rate(opd_trainer_rollouts_total{namespace=~"$namespace", job=~"$job"}[5m]))')
    assert student_problems('sum by (job) (rate(opd_trainer_rollouts_total{namespace=~"$namespace", job=~"$job"}[5m]))')
    assert student_problems("opd_trainer_loss")
    assert student_problems("sum by (namespace) (rate(opd_teacher_scored_tokens_total[5m]))")
    assert student_problems('max by (namespace, job) (opd_rollout_policy_version{job=~"$job"})')
    assert student_problems("sum by (namespace) (opd_teacher_queue_depth_requests)") == []
    assert student_problems('opd_trainer_step{namespace=~"$namespace", job=~"$job"} / opd_trainer_tokens_per_second')


def test_dashboard_has_per_student_variables():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    for name, source in (("namespace", "namespace)"), ("job", "job)")):
        variable = variables[name]
        assert variable["type"] == "query" and variable["query"] == variable["definition"]
        assert variable["query"].startswith("label_values(") and variable["query"].endswith(source)
        assert variable["includeAll"] and variable["allValue"] == ".*", (
            "All must also match series without the label (docker compose has no namespace)"
        )
        assert variable["datasource"]["uid"] == "${datasource}"
        names = metric_names(variable["query"].split("(", 1)[1].rsplit(",", 1)[0])
        assert names and set(names) <= exported_series(), variable["query"]
    assert "$namespace" in variables["job"]["query"], "the student list follows the namespace"


@pytest.mark.parametrize(("title", "expr"), queries(), ids=[f"{t}-{i}" for i, (t, _) in enumerate(queries())])
def test_dashboard_query_never_sums_two_students(title, expr):
    assert student_problems(expr) == [], title


# ---------------------------------------------------------------------------------------------- provisioning


def test_grafana_provisioning_points_at_the_deployments_prometheus_and_dashboard_folder():
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "opd.yml").read_text())
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "opd.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://opd-prometheus:9090"
    (dashboards,) = provider["providers"]
    services = cp.project(cp.BASE_FILE)["services"]
    assert "opd-prometheus" in services
    grafana = services["opd-grafana"]
    targets = {(cp.COMPOSE_DIR / s).resolve(): t for s, t, _ in cp.volume_mounts(grafana) if s.startswith("../")}
    assert targets[GRAFANA / "dashboards"] == dashboards["options"]["path"]
    assert targets[GRAFANA / "provisioning"] == "/etc/grafana/provisioning"
    home = cp.environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == dashboards["options"]["path"] + "/" + DASHBOARD.name


# ---------------------------------------------------------------------------------------------- prometheus


def test_compose_prometheus_scrapes_one_job_per_student_and_the_teacher():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"]), "duplicate job names"
    (teacher_sd,) = jobs["opd-teacher"]["dns_sd_configs"]
    assert teacher_sd["port"] == OPS_PORTS["teacher"] and teacher_sd["names"] == ["opd-teacher"]
    services = cp.project(cp.BASE_FILE, cp.TWO_STUDENTS_FILE)["services"]
    for job_name, job in jobs.items():
        assert job.get("metrics_path", "/metrics") == "/metrics"
        if job_name in ("opd-teacher", "prometheus"):
            continue
        if job_name == "opd-redis":  # the exporter beside Redis (OpdRedisMemoryNearMax)
            (static,) = job["static_configs"]
            host = static["targets"][0].split(":")[0]
            assert [s for s, svc in services.items() if host in cp.aliases(s, svc)], f"no service answers to {host}"
            continue
        ports = {sd["port"] for sd in job["dns_sd_configs"]}
        assert ports == {OPS_PORTS["rollout"], OPS_PORTS["trainer"]}, job_name
        for sd in job["dns_sd_configs"]:
            assert sd["type"] == "A"
            for name in sd["names"]:  # every service behind the job's names is that student's
                behind = [s for s, svc in services.items() if name in cp.aliases(s, svc)]
                assert behind, f"{job_name}: no service answers to {name}"
                for service in behind:
                    env = cp.environment(services[service])
                    namespace = env.get("OPD_ROLLOUT__REDIS__NAMESPACE") or _trainer_namespace(services[service])
                    assert namespace == job_name, f"{service} (student {namespace}) is scraped as job {job_name}"
    assert TeacherGrpc().port == 50051  # the port the deployments' teacher addresses and probes use


def _trainer_namespace(service: dict) -> str:
    command = cp.as_list(service.get("command"))
    if "--redis-namespace" in command:
        return command[command.index("--redis-namespace") + 1]
    return "student-a"  # train-cpu-demo.yaml / train-gpu.yaml


def _relabel(labels: dict[str, str], rules: list[dict]) -> dict[str, str] | None:
    """Prometheus relabelling (keep, drop, replace) of one target; None when dropped."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$(\d+)", r"\\\1", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(replacement)
    return labels


def _pod(component: str, port: int, index: str | None = None) -> dict[str, str]:
    labels = {
        "__address__": "10.1.2.3:8080",
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_annotation_prometheus_io_port": str(port),
        "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics",
        "__meta_kubernetes_pod_label_app_kubernetes_io_part_of": "opd",
        "__meta_kubernetes_pod_label_app_kubernetes_io_component": component,
        "__meta_kubernetes_pod_label_app_kubernetes_io_instance": f"opd-{component}",
        "job": "opd-pods",
    }
    if index is not None:
        labels["__meta_kubernetes_pod_label_batch_kubernetes_io_job_completion_index"] = index
    return labels


def test_kubernetes_prometheus_scrapes_annotated_pods_and_only_trainer_rank_zero():
    config = yaml.safe_load((PROMETHEUS / "prometheus-kubernetes.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "opd-pods"]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    rules = job["relabel_configs"]
    teacher = _relabel(_pod("teacher", OPS_PORTS["teacher"]), rules)
    assert teacher["__address__"] == f"10.1.2.3:{OPS_PORTS['teacher']}" and teacher["__metrics_path__"] == "/metrics"
    assert teacher["component"] == "teacher" and teacher["job"] == "opd-teacher"
    labels = {
        **_pod("rollout", OPS_PORTS["rollout"]),
        "__meta_kubernetes_pod_label_app_kubernetes_io_instance": "student-b",
    }
    student = _relabel(labels, rules)
    assert student["job"] == "student-b", "job = the student (the dashboard's variable)"
    assert _relabel(_pod("trainer", OPS_PORTS["trainer"], index="0"), rules) is not None
    assert _relabel(_pod("trainer", OPS_PORTS["trainer"], index="1"), rules) is None
    unannotated = _pod("rollout", OPS_PORTS["rollout"])
    unannotated["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] = ""
    assert _relabel(unannotated, rules) is None
    assert _relabel({**_pod("rollout", 9102), "__meta_kubernetes_pod_phase": "Succeeded"}, rules) is None
