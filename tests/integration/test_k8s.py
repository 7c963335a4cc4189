"""deploy/k8s/ validated offline, and consistent with itself and with the server.

How each object is checked:
- Built-in kinds (StatefulSet, Service, ...): kubernetes-validate's bundled OpenAPI schemas, in
  strict mode (unknown fields are errors), for the oldest and newest Kubernetes we target.
- InferencePool and PodMonitor: their CRDs' own openAPIV3Schema, vendored in
  tests/data/crd_schemas/ (see its README), plus a walk that refuses fields the schema does not
  declare, as the API server's strict field validation does.
- HTTPRoute (Gateway API) and the EndpointPickerConfig (a file in a ConfigMap, not an object):
  structurally, by the fields and references that routing depends on. No schema is vendored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.cli import build_parser
from tests.integration.live_server import REPO_ROOT, LiveServer

K8S = REPO_ROOT / "deploy" / "k8s"
CRD_SCHEMAS = Path(__file__).resolve().parents[1] / "data" / "crd_schemas"
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
STRUCTURAL_KINDS = {"HTTPRoute"}
MIN_STARTUP_BUDGET_S = 600  # a large model read from network storage and quantized on load


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object by (kind, name); names are unique per kind."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for _, doc in manifests():
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in found, f"two {key}"
        found[key] = doc
    return found


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """Vendored CRD schemas by (apiVersion, kind)."""
    schemas = {}
    for path in CRD_SCHEMAS.glob("*.json"):
        crd = json.loads(path.read_text())
        schemas[f"{crd['group']}/{crd['version']}", crd["kind"]] = crd["openAPIV3Schema"]
    return schemas


def undeclared_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields of `value` its structural schema does not declare (what strict validation refuses)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += undeclared_fields(item, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            found += undeclared_fields(item, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += undeclared_fields(item, schema["items"], f"{path}[{i}]")
    return found


def the(kind: str, name: str) -> dict[str, Any]:
    return objects()[kind, name]


def container(pod_owner: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_owner["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def port(c: dict[str, Any], name: str) -> int:
    (number,) = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return number


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def epp_config() -> dict[str, Any]:
    configmap = the("ConfigMap", "loraplex-epp")
    (text,) = configmap["data"].values()
    return yaml.safe_load(text)


def engine_config(name: str = "loraplex") -> dict[str, Any]:
    (extractor,) = [p for p in epp_config()["plugins"] if p["type"] == "core-metrics-extractor"]
    (engine,) = [e for e in extractor["parameters"]["engineConfigs"] if e["name"] == name]
    return engine


# ---- schemas ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_built_in_objects_are_valid_in_strict_mode(version: str) -> None:
    schemas = crd_schemas()
    checked = 0
    for path, doc in manifests():
        if (doc["apiVersion"], doc["kind"]) in schemas or doc["kind"] in STRUCTURAL_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 10


def test_custom_resources_are_valid_against_their_vendored_crd_schemas() -> None:
    schemas = crd_schemas()
    kinds = set()
    for path, doc in manifests():
        schema = schemas.get((doc["apiVersion"], doc["kind"]))
        if schema is None:
            continue
        errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
        assert not errors, (path.name, errors)
        assert not undeclared_fields(doc, schema), (path.name, undeclared_fields(doc, schema))
        kinds.add(doc["kind"])
    assert kinds == {"InferencePool", "PodMonitor"}


def test_the_strict_walk_refuses_an_undeclared_field() -> None:
    pool = the("InferencePool", "loraplex")
    schema = crd_schemas()[pool["apiVersion"], "InferencePool"]
    typo = {**pool, "spec": {**pool["spec"], "targetPort": [{"number": 8000}]}}
    assert undeclared_fields(typo, schema) == [".spec.targetPort"]


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(present)


# ---- the server's StatefulSet -----------------------------------------------------------------


def test_the_statefulset_runs_a_valid_serve_command_with_both_ports() -> None:
    loraplex = container(the("StatefulSet", "loraplex"), "loraplex")
    args = build_parser().parse_args(loraplex["args"])
    assert (args.command, args.host, args.data_dir) == ("serve", "0.0.0.0", "/data")
    assert args.port == port(loraplex, "http")
    assert args.metrics_port == port(loraplex, "metrics")


def test_the_statefulsets_environment_sets_real_serve_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loraplex = container(the("StatefulSet", "loraplex"), "loraplex")
    for env in loraplex["env"]:
        monkeypatch.setenv(env["name"], "from-env")
    args = vars(build_parser().parse_args(loraplex["args"]))
    for env in loraplex["env"]:
        assert args[env["name"].removeprefix("LORAPLEX_").lower()] == "from-env", env["name"]


def test_probes_liveness_on_health_readiness_and_startup_on_ready() -> None:
    loraplex = container(the("StatefulSet", "loraplex"), "loraplex")
    probes = {k: loraplex[k] for k in ("livenessProbe", "readinessProbe", "startupProbe")}
    paths = {k: p["httpGet"]["path"] for k, p in probes.items()}
    assert paths == {
        "livenessProbe": "/health",
        "readinessProbe": "/ready",
        "startupProbe": "/ready",
    }
    assert all(p["httpGet"]["port"] == "http" for p in probes.values())
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MIN_STARTUP_BUDGET_S


def test_each_replica_gets_a_gpu_and_its_own_data_volume() -> None:
    statefulset = the("StatefulSet", "loraplex")
    loraplex = container(statefulset, "loraplex")
    assert loraplex["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert loraplex["resources"]["requests"]["nvidia.com/gpu"] == 1
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in loraplex["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_the_governing_service_selects_the_pods_and_leaves_the_metrics_port_out() -> None:
    statefulset, service = the("StatefulSet", "loraplex"), the("Service", "loraplex")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_only_the_picker_and_monitoring_reach_the_keyless_metrics_port() -> None:
    policy = the("NetworkPolicy", "loraplex")
    (metrics_rule,) = [r for r in policy["spec"]["ingress"] if r["ports"] == [{"port": "metrics"}]]
    epp_labels = the("Deployment", "loraplex-epp")["spec"]["template"]["metadata"]["labels"]
    sources = metrics_rule["from"]
    assert any(
        s.get("podSelector", {}).get("matchLabels", {}).items() <= epp_labels.items()
        for s in sources
    )
    assert all(s.get("podSelector") or s.get("namespaceSelector") for s in sources)


def test_the_pod_monitor_scrapes_the_metrics_port_of_the_pods() -> None:
    monitor = the("PodMonitor", "loraplex")
    statefulset = the("StatefulSet", "loraplex")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    port(container(statefulset, "loraplex"), "metrics")  # the named port exists


# ---- LoRA-aware routing -----------------------------------------------------------------------


def test_the_pool_targets_the_api_port_of_the_pods_and_names_the_picker() -> None:
    pool, statefulset = the("InferencePool", "loraplex"), the("StatefulSet", "loraplex")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pool["spec"]["targetPorts"] == [
        {"number": port(container(statefulset, "loraplex"), "http")}
    ]
    ref = pool["spec"]["endpointPickerRef"]
    picker = the("Service", ref["name"])
    assert ref["port"]["number"] in [p["port"] for p in picker["spec"]["ports"]]


def test_the_picker_watches_this_pool_and_scrapes_the_keyless_metrics_port() -> None:
    epp = the("Deployment", "loraplex-epp")
    args = container(epp, "epp")["args"]
    assert flag(args, "--pool-name") == the("InferencePool", "loraplex")["metadata"]["name"]
    metrics_port = port(container(the("StatefulSet", "loraplex"), "loraplex"), "metrics")
    assert flag(args, "--model-server-metrics-port") == str(metrics_port)
    config_path = Path(flag(args, "--config-file"))
    (mount,) = container(epp, "epp")["volumeMounts"]
    (volume,) = epp["spec"]["template"]["spec"]["volumes"]
    assert (mount["mountPath"], mount["name"]) == (str(config_path.parent), volume["name"])
    assert config_path.name in the("ConfigMap", volume["configMap"]["name"])["data"]
    picker_service = the("Service", "loraplex-epp")
    assert (
        picker_service["spec"]["selector"].items()
        <= epp["spec"]["template"]["metadata"]["labels"].items()
    )


def test_the_picker_config_refers_only_to_declared_plugins_and_scores_lora_affinity() -> None:
    config = epp_config()
    assert config["kind"] == "EndpointPickerConfig"
    declared = {p.get("name", p["type"]) for p in config["plugins"]}
    refs = {p["pluginRef"] for prof in config["schedulingProfiles"] for p in prof["plugins"]}
    refs |= {s["pluginRef"] for s in config["dataLayer"]["sources"]}
    refs |= {e["pluginRef"] for s in config["dataLayer"]["sources"] for e in s["extractors"]}
    assert refs <= declared, refs - declared
    assert "lora-affinity-scorer" in refs


def test_the_picker_uses_our_metric_names_for_the_pods_engine_label() -> None:
    (extractor,) = [p for p in epp_config()["plugins"] if p["type"] == "core-metrics-extractor"]
    params = extractor["parameters"]
    pod_labels = the("StatefulSet", "loraplex")["spec"]["template"]["metadata"]["labels"]
    assert params["defaultEngine"] == "loraplex"
    assert pod_labels["inference.networking.k8s.io/engine-type"] == "loraplex"
    assert pod_labels["llm-d.ai/engine-type"] == "loraplex"
    specs = {k: v for k, v in engine_config().items() if k.endswith("Spec")}
    assert set(specs) == {
        "queuedRequestsSpec",
        "runningRequestsSpec",
        "kvUsageSpec",
        "loraSpec",
        "cacheInfoSpec",
    }


def test_every_metric_the_picker_reads_is_exported_with_the_labels_it_parses(
    server: LiveServer,
) -> None:
    families = server.metrics().families
    for key, spec in engine_config().items():
        if key.endswith("Spec"):
            assert spec in families, (key, spec)
            assert families[spec].type == "gauge", (key, spec)
    lora = families[engine_config()["loraSpec"]].samples
    assert lora and {"running_lora_adapters", "waiting_lora_adapters", "max_lora"} <= set(
        lora[0].labels
    )
    cache = families[engine_config()["cacheInfoSpec"]].samples
    assert cache and {"block_size", "num_gpu_blocks"} <= set(cache[0].labels)


def test_the_route_sends_everything_to_the_pool() -> None:
    route = the("HTTPRoute", "loraplex")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert backend == {
        "group": "inference.networking.k8s.io",
        "kind": "InferencePool",
        "name": "loraplex",
    }
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    (parent,) = route["spec"]["parentRefs"]
    assert parent["kind"] == "Gateway" and parent["name"]
