"""deploy/ and the Dockerfile agree with the server: the dashboard queries metrics the server
exports, Prometheus scrapes the compose service, and the image's command parses."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from server.cli import build_parser
from server.metrics_vllm import VLLM_NAMES
from tests.integration.live_server import REPO_ROOT, LiveServer

DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraplex.json"
METRIC_NAME = re.compile(r"\bloraplex_[a-z_]+\b")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}


def test_every_metric_the_dashboard_queries_is_exported(server: LiveServer) -> None:
    # From the families' names and types: a labelled series has no samples before its first use.
    families = server.metrics().families.values()
    exported = {f.name + s for f in families for s in SERIES_SUFFIXES.get(f.type, ("",))}
    queried = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    assert queried
    assert queried <= exported, sorted(queried - exported)


def test_the_dashboard_covers_every_exported_family(server: LiveServer) -> None:
    families = set(server.metrics().families)
    queried = " ".join(dashboard_exprs())
    missing = {f for f in families if f not in queried}
    assert not missing, sorted(missing)


def test_the_dashboard_uses_the_provisioned_datasource() -> None:
    provisioned = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    uid = provisioned["datasources"][0]["uid"]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert {p["datasource"]["uid"] for p in panels if "datasource" in p} == {uid}


def test_prometheus_scrapes_the_compose_services_unpublished_metrics_port() -> None:
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    loraplex = compose["services"]["loraplex"]
    scrape = load_yaml(DEPLOY / "prometheus.yml")["scrape_configs"][0]
    metrics_port = loraplex["environment"]["LORAPLEX_METRICS_PORT"]
    assert scrape["metrics_path"] == "/metrics"
    assert scrape["static_configs"][0]["targets"] == [f"loraplex:{metrics_port}"]
    assert "8000:8000" in loraplex["ports"]
    assert not any(p.endswith(f":{metrics_port}") for p in loraplex["ports"])  # keyless: private
    assert set(compose["services"]) == {"loraplex", "prometheus", "grafana"}


def test_compose_mounts_files_that_exist() -> None:
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    for service in ("prometheus", "grafana"):
        for volume in compose["services"][service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (service, source)


def test_the_images_command_is_a_valid_serve_command_on_all_interfaces() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    args = build_parser().parse_args(cmd)
    assert (args.command, args.host, args.data_dir) == ("serve", "0.0.0.0", "/data")
    assert re.search(r"^USER (?!root)\w+$", text, re.MULTILINE)
    assert re.search(r'^VOLUME \["/data"\]$', text, re.MULTILINE)
    healthcheck = re.search(r"^HEALTHCHECK (?:.*\\\n)*.*$", text, re.MULTILINE)
    assert healthcheck and " CMD " in healthcheck.group(0) and "/health" in healthcheck.group(0)


def monitoring_section() -> str:
    text = (REPO_ROOT / "docs" / "operations.md").read_text()
    return text[text.index("## Monitoring") : text.index("## Kubernetes")]


def test_the_operations_guide_documents_every_exported_metric(server: LiveServer) -> None:
    documented = monitoring_section()
    families = server.metrics().families
    missing = [f for f in families if f"`{f.removeprefix('loraplex_')}" not in documented]
    assert not missing, missing


def test_the_operations_guide_lists_every_vllm_name() -> None:
    documented = monitoring_section()
    names = [name for names in VLLM_NAMES.values() for name in names]
    assert not [n for n in names if f"`{n}" not in documented]
