"""opd's alerting rules under `promtool test rules`: each rule fires on the series it watches for, and stays silent
on healthy ones. Also: the rules file is valid (`promtool check rules`, templates included), and the compose
Prometheus and the PrometheusRule carry the same rules.

The unit tests run on a copy of the rules without annotations (promtool compares annotations exactly; the
expressions and `for:` durations are what is under test; `check rules` parses the annotation templates).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.commands import REPO

RULES = REPO / "deploy" / "prometheus" / "rules" / "opd-alerts.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; `make system-deps` installs it)"
)

TRAINER = {"job": "student-a", "namespace": "opd", "instance": "10.0.0.7:9103"}
TEACHER = {"job": "opd-teacher", "namespace": "opd", "instance": "10.0.0.5:9101"}
REDIS = {"job": "opd-redis", "namespace": "opd", "instance": "10.0.0.9:9121"}


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{inner}}}", "values": values}


def _latency(metric: str, slow: bool) -> list[dict[str, str]]:
    """Histogram buckets of 60 requests/min: all under 1 s (fast), or all between 30 and 60 s (slow)."""
    buckets = {"1": "0+0x40" if slow else "0+60x40", "30": "0+0x40" if slow else "0+60x40", "60": "0+60x40"}
    buckets["+Inf"] = "0+60x40"
    return [_series(f"{metric}_bucket", {**TEACHER, "le": le}, v) for le, v in buckets.items()]


def _rollouts(stale_per_min: int, trained_per_min: int) -> list[dict[str, str]]:
    return [
        _series("opd_trainer_rollouts_total", {**TRAINER, "outcome": "dropped_stale"}, f"0+{stale_per_min}x60"),
        _series("opd_trainer_rollouts_total", {**TRAINER, "outcome": "trained"}, f"0+{trained_per_min}x60"),
    ]


# alert -> (eval time, series that fire it, the alert's labels, series that keep it silent)
CASES = {
    "OpdDeadLettersGrowing": (
        "20m",
        [_series("opd_rollout_dead_lettered_records_total", TRAINER, "0+1x30")],
        {"job": "student-a", "namespace": "opd", "severity": "warning"},
        [_series("opd_rollout_dead_lettered_records_total", TRAINER, "3x30")],  # old dead letters, none new
    ),
    "OpdTeacherLatencyHigh": (
        "30m",
        _latency("opd_teacher_request_latency_seconds", slow=True),
        {"job": "opd-teacher", "namespace": "opd", "severity": "warning"},
        _latency("opd_teacher_request_latency_seconds", slow=False),
    ),
    "OpdTeacherQueueWaitHigh": (
        "30m",
        _latency("opd_teacher_queue_wait_seconds", slow=True),
        {"job": "opd-teacher", "namespace": "opd", "severity": "warning"},
        _latency("opd_teacher_queue_wait_seconds", slow=False),
    ),
    "OpdTeacherClientThrottled": (
        "30m",
        [
            _series(
                "opd_teacher_requests_total",
                {**TEACHER, "client": "student-b", "code": "RESOURCE_EXHAUSTED", "rpc": "ScoreStream"},
                "0+60x40",
            )
        ],
        {"client": "student-b", "namespace": "opd", "severity": "warning"},
        [
            _series(
                "opd_teacher_requests_total",
                {**TEACHER, "client": "student-b", "code": "RESOURCE_EXHAUSTED", "rpc": "ScoreStream"},
                "0+1x40",
            )
        ],  # one a minute: 0.017/s
    ),
    "OpdTrainerStalled": (
        "60m",
        [_series("opd_trainer_step", TRAINER, "0+1x10 10x60"), _series("up", TRAINER, "1x70")],
        {**TRAINER, "severity": "critical"},
        [_series("opd_trainer_step", TRAINER, "0+1x70"), _series("up", TRAINER, "1x70")],
    ),
    "OpdStaleDropShareHigh": (
        "45m",
        _rollouts(stale_per_min=30, trained_per_min=60),
        {"job": "student-a", "namespace": "opd", "severity": "warning"},
        _rollouts(stale_per_min=3, trained_per_min=60),
    ),
    "OpdRedisMemoryNearMax": (
        "20m",
        [
            _series("redis_memory_used_bytes", REDIS, "2500000000x30"),
            _series("redis_memory_max_bytes", REDIS, "2684354560x30"),
        ],
        {**REDIS, "severity": "critical"},
        # maxmemory 0 means "no limit": the ratio is not computed, not infinite
        [_series("redis_memory_used_bytes", REDIS, "2500000000x30"), _series("redis_memory_max_bytes", REDIS, "0x30")],
    ),
    "OpdTargetDown": (
        "10m",
        [_series("up", TRAINER, "0x20")],
        {**TRAINER, "severity": "warning"},
        [_series("up", TRAINER, "1x20"), _series("up", {"job": "prometheus", "instance": "localhost:9090"}, "0x20")],
    ),
    "OpdTeacherAbsent": (
        "10m",
        [_series("up", {**TEACHER, "instance": "a"}, "0x20"), _series("up", {**TEACHER, "instance": "b"}, "0x20")],
        {"severity": "critical"},  # absent() of a filtered vector keeps no label
        [_series("up", {**TEACHER, "instance": "a"}, "0x20"), _series("up", {**TEACHER, "instance": "b"}, "1x20")],
    ),
}


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def test_every_rule_has_a_firing_and_a_silent_case():
    assert sorted(r["alert"] for r in _rules()) == sorted(CASES)


@needs_promtool
def test_rules_file_is_valid():
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def bare_rules(tmp_path_factory) -> Path:
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    path = tmp_path_factory.mktemp("rules") / "opd-alerts.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


@needs_promtool
@pytest.mark.parametrize("alert", sorted(CASES))
@pytest.mark.parametrize("fires", [True, False], ids=["fires", "silent"])
def test_rule(alert, fires, bare_rules, tmp_path):
    eval_time, firing, labels, healthy = CASES[alert]
    expected = [{"exp_labels": labels}] if fires else []
    test = {
        "rule_files": [str(bare_rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": firing if fires else healthy,
                "alert_rule_test": [{"eval_time": eval_time, "alertname": alert, "exp_alerts": expected}],
            }
        ],
    }
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    out = _promtool("test", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_prometheus_loads_the_rules_file():
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    compose = yaml.safe_load((REPO / "deploy" / "compose" / "docker-compose.yml").read_text())
    assert "../prometheus/rules:/etc/prometheus/rules:ro" in compose["services"]["opd-prometheus"]["volumes"]


def test_prometheusrule_carries_the_same_rules():
    path = REPO / "deploy" / "k8s" / "components" / "alerts" / "prometheusrule.yaml"
    (rule,) = [o for o in yaml.safe_load_all(path.read_text()) if o]
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(RULES.read_text()), f"{path} differs from {RULES}: copy the groups over"


@pytest.mark.parametrize("rule", _rules(), ids=[r["alert"] for r in _rules()])
def test_rules_read_only_series_opd_or_redis_exporter_export(rule):
    from tests.deploy.test_monitoring import exported_series, metric_names

    unknown = [name for name in metric_names(rule["expr"]) if name not in exported_series() | {"up"}]
    assert unknown == [], f"{rule['alert']}: {unknown} are exported by nothing opd runs"
