"""What operations deploy: docker-compose.yml, the Dockerfile, Prometheus's scrape config and
alert rules (checked and unit-tested with the real promtool), the Grafana dashboard. No Docker
engine runs here, so the compose file is checked for structure; every metric a rule or a panel
reads must be one the service defines."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from infra import metrics
from infra.settings import Settings
from meter.cli import build_parser
from tests.helpers import require_binary

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
RUNBOOK = "docs/runbook.md"  # what on-call reads: one section per alert, named after it
DASHBOARD = GRAFANA / "dashboards" / "meter.json"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = load_yaml(ROOT / "docker-compose.yml")
    assert isinstance(doc, dict)
    return doc


def exposed_names() -> set[str]:
    """Every sample name the service's metrics can expose (labelled ones included before use)."""
    assert metrics.EVENTS_CHARGED is not None  # infra.metrics is imported: all are registered
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
    }
    names = set()
    for family in REGISTRY.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bmeter_[a-z0-9_]+", expr))


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(PROM / "alerts.yml")["groups"] for r in g["rules"] if "alert" in r]


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


# --- docker-compose.yml ------------------------------------------------------------------------


def test_every_service_has_an_image_or_build_a_healthcheck_and_conditional_depends_on(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert {"kafka", "redis", "postgres", "metering", "ops", "prometheus", "grafana"} <= set(
        services
    )
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        check = svc.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), name
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            assert spec["condition"] in ("service_healthy", "service_started"), (name, dep)
    for name, svc in services.items():
        if svc.get("build"):  # the service's own processes wait for healthy stores
            for dep in ("kafka", "redis", "postgres"):
                assert svc["depends_on"][dep]["condition"] == "service_healthy", name


def test_images_are_pinned_real_ones(compose: dict[str, Any]) -> None:
    images = {name: svc.get("image", "") for name, svc in compose["services"].items()}
    assert images["kafka"] == "apache/kafka:3.9.0"
    assert images["redis"].startswith("redis:7")
    assert images["postgres"].startswith("postgres:16")
    assert images["prometheus"].startswith("prom/prometheus:v2.")
    assert images["grafana"].startswith("grafana/grafana:11.")
    for name, image in images.items():
        assert ":latest" not in image or "build" in compose["services"][name], name


def test_kafka_runs_in_kraft_mode(compose: dict[str, Any]) -> None:
    env = compose["services"]["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert str(env["KAFKA_NODE_ID"]) in env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")[0]
    assert "CONTROLLER://" in env["KAFKA_LISTENERS"]
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert env["CLUSTER_ID"]
    assert not any(k.startswith("KAFKA_ZOOKEEPER") for k in env)
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"


def test_redis_keeps_an_append_only_file_and_never_evicts(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    args = [str(a) for a in redis["command"]]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in redis["volumes"])


def run_choices() -> set[str]:
    """The processes ``meter run`` knows, from the CLI's own parser."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    run = sub.choices["run"]
    process = next(a for a in run._actions if a.dest == "process")
    return set(process.choices or ())


def test_every_process_of_the_service_runs_with_settings_the_service_knows(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    ours = {name: svc for name, svc in services.items() if svc.get("build") == "."}
    commands = {name: svc["command"] for name, svc in ours.items()}
    assert all(c[:2] == ["meter", "run"] for c in commands.values()), commands
    assert {c[2] for c in commands.values()} == run_choices()  # each process, none unknown
    assert services["metering"]["deploy"]["replicas"] >= 2
    for name in ours:
        env = {k: str(v) for k, v in services[name]["environment"].items()}
        # Settings.from_env rejects an unknown METER_* name and a value it cannot parse.
        settings = Settings.from_env({k: v for k, v in env.items() if k.startswith("METER_")})
        assert settings.kafka_bootstrap == "kafka:9092"
        assert settings.redis_url == "redis://redis:6379/0"
        assert "@postgres:5432/" in settings.database_url
        assert settings.metrics_addr == "0.0.0.0" and settings.metrics_port == 9464
        assert settings.log_format == "json"
        # The probe asks the process itself: its metrics endpoint, or the API it serves.
        probe = " ".join(services[name]["healthcheck"]["test"])
        ports = {str(settings.metrics_port), env.get("METER_API_PORT", "")} - {""}
        assert any(f"http://127.0.0.1:{port}/" in probe for port in ports), (name, probe)


def test_prometheus_and_grafana_mount_the_files_of_deploy(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for svc in ("prometheus", "grafana"):
        for volume in services[svc]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_dir(), volume
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/etc/grafana/dashboards/" + DASHBOARD.name
    for volume in compose.get("volumes", {}):
        assert any(
            str(v).startswith(volume + ":")
            for svc in services.values()
            for v in svc.get("volumes", [])
        ), volume


def test_dockerfile_builds_the_package_from_what_exists() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert next(x for x in lines if x.startswith("FROM")) == "FROM python:3.11-slim"
    copied = [x.split()[1] for x in lines if x.startswith("COPY ")]
    for source in copied:
        assert (ROOT / source).exists(), source
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    packages = {p.rstrip("*") for p in find["find"]["include"]}
    assert packages <= set(copied), packages - set(copied)
    assert any("pip install ." in x for x in lines)
    assert any(x.startswith("USER ") and "root" not in x for x in lines)


# --- Prometheus --------------------------------------------------------------------------------


def test_promtool_accepts_the_config_and_the_rules() -> None:
    promtool = require_binary("promtool")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        out = subprocess.run(
            [promtool, *args], cwd=PROM, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    promtool = require_binary("promtool")
    out = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=PROM,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def anchors(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings, as GitHub makes them."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # not in code
    return {
        re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", text, flags=re.M)
    }


def test_every_alert_has_a_case_where_it_fires_and_a_runbook_entry() -> None:
    cases = load_yaml(PROM / "alerts_test.yml")["tests"]
    fired = {
        t["alertname"] for c in cases for t in c.get("alert_rule_test", []) if t["exp_alerts"]
    }
    quiet = {
        t["alertname"]
        for c in cases
        for t in c.get("alert_rule_test", [])
        if not t["exp_alerts"]
    }
    runbook_anchors = anchors(ROOT / RUNBOOK)
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names))
    required = {
        "MeterConsumerLagGrowing",
        "MeterDeadLettersSpiking",
        "MeterBalanceDrift",
        "MeterAuthorizeLatencyOverBudget",
        "MeterRechargeCapHits",
        "MeterProcessDown",
    }
    assert required <= set(names)
    for rule in alert_rules():
        assert rule["alert"] in fired, f"{rule['alert']}: no test case where it fires"
        assert rule["alert"] in quiet, f"{rule['alert']}: no test case where it stays quiet"
        assert rule["labels"]["severity"] in ("critical", "warning")
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert page == RUNBOOK, f"{rule['alert']}: its runbook is {RUNBOOK}, not {page}"
        assert anchor in runbook_anchors, f"{rule['alert']}: {RUNBOOK} has no section #{anchor}"


def test_every_link_of_the_readme_and_docs_leads_to_a_page_and_its_section() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert len(pages) > 5
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {target}"
            assert linked.exists(), f"{where}: no such file"
            if anchor:
                assert anchor in anchors(linked), f"{where}: no such section"


def test_rules_and_panels_read_only_metrics_the_service_defines() -> None:
    known = exposed_names()
    used = {(r["alert"], n) for r in alert_rules() for n in metric_names(r["expr"])}
    used |= {(title, n) for title, expr in dashboard_exprs() for n in metric_names(expr)}
    unknown = sorted((where, n) for where, n in used if n not in known)
    assert not unknown, unknown
    # and the metrics issue 6 names are all read by a rule or a panel
    read = {n for _, n in used}
    for name in (
        "meter_events_consumed_total",
        "meter_events_charged_total",
        "meter_dead_letters_total",
        "meter_batch_records_count",
        "meter_batch_duration_seconds_bucket",
        "meter_consumer_lag_records",
        "meter_redis_command_duration_seconds_bucket",
        "meter_postgres_query_duration_seconds_bucket",
        "meter_authorize_duration_seconds_bucket",
        "meter_authorize_decisions_total",
        "meter_reservations_live",
        "meter_accounts",
        "meter_signals_published_total",
        "meter_recharges_total",
        "meter_recharge_cap_hits_total",
        "meter_reconcile_drift_micros",
    ):
        assert name in read, name


# --- Grafana -----------------------------------------------------------------------------------


def test_dashboard_is_provisioned_with_the_panels_on_call_opens_first() -> None:
    source = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    [ds] = source["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    [provider] = load_yaml(GRAFANA / "provisioning" / "dashboards" / "meter.yml")["providers"]
    assert provider["type"] == "file"

    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    panels = dash["panels"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for word in ("throughput", "lag", "authorize latency", "hold", "recharge", "drift"):
        assert word in titles, word
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"]["uid"] == ds["uid"], p["title"]
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == ds["uid"], p["title"]


def test_label_values_created_at_zero_are_the_ones_the_service_uses() -> None:
    from enforcement.authorize import DENY_REASONS

    assert set(metrics.AUTHORIZE_DENY_REASONS) == set(DENY_REASONS)
    guide = (ROOT / "docs" / "integration.md").read_text()
    documented = re.search(r"^Dead-letter reasons: (.+?)\.$", guide, flags=re.M | re.S)
    assert documented is not None
    assert set(metrics.DEAD_LETTER_REASONS) == set(re.findall(r"`([a-z_]+)`", documented[1]))
