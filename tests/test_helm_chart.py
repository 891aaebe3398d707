"""The Helm chart (deploy/helm/sidekey): helm lint and helm template for the default values and
every example, the rendered objects against the Kubernetes 1.30 and 1.37 schemas
(kubernetes-validate, strict), a checkov scan with no failed check, and the chart's promises:
the native sidecar, the hardened containers, no Secret, the keys the chart owns, probes and
the drain, one Service per gateway listener, the NetworkPolicy, and the values it refuses.

Starting what the sidecar example describes is tests/test_helm_sidecar.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.helm import CHART, EXAMPLES, NAMESPACE, Helm, config_of, containers, find, pod_spec

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema
# kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
CHECKOV_VERSION = "3.3.30"
CHECKOV = (
    Path(os.environ.get("SIDEKEY_CACHE", Path.home() / ".cache" / "sidekey"))
    / f"checkov-{CHECKOV_VERSION}"
    / "bin"
    / "checkov"
)
# A scan of a few rendered files; checkov itself takes ~10 s to start on an idle box.
CHECKOV_SECONDS = 300.0

# Every values file a user may start from, and variants that switch on what they leave off.
VALUE_SETS: dict[str, tuple[Any, ...]] = {
    "default": (),
    **{Path(e).stem: (e,) for e in EXAMPLES},
    "gateway-hostpath-audit-volume": (
        "examples/gateway.yaml",
        {
            "spiffe": {"source": "hostPath"},
            "audit": {"volume": {"persistentVolumeClaim": {"claimName": "sidekey-audit"}}},
            "gateway": {"autoscaling": {"enabled": False}},
            "image": {"digest": "sha256:" + "0" * 64},
        },
    ),
    "sidecar-egress-and-app-ingress": (
        "examples/sidecar.yaml",
        {
            "networkPolicy": {
                "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": 53}]}]
            },
            "app": {"ingress": [{"ports": [{"port": 8080}]}]},
        },
    ),
}

HARDENED = {
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
}


def test_examples_are_there():
    assert EXAMPLES == ["examples/gateway.yaml", "examples/sidecar.yaml"]


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint(helm: Helm, name: str):
    helm.lint(*VALUE_SETS[name])


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> dict[str, list[dict[str, Any]]]:
    return {name: helm.template(*values) for name, values in VALUE_SETS.items()}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_objects_match_the_kubernetes_schemas(rendered, version: str):
    checked = 0
    for name, docs in rendered.items():
        for doc in docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                _check_service_monitor(doc)  # a CRD: not in Kubernetes' own schemas
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")
            checked += 1
    assert checked >= 20


def _check_service_monitor(doc: dict[str, Any]) -> None:
    """The fields of monitoring.coreos.com/v1 ServiceMonitor the chart sets (prometheus-operator's
    CRD is not bundled with kubernetes-validate)."""
    assert doc["kind"] == "ServiceMonitor"
    assert set(doc["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    (endpoint,) = doc["spec"]["endpoints"]
    assert endpoint["port"] == "admin"
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"[0-9]+(ms|s|m|h)", endpoint["interval"])


def test_checkov_finds_nothing(rendered):
    if not CHECKOV.is_file():
        pytest.fail(f"{CHECKOV} is missing: install it with `make chart-tools`")
    with tempfile.TemporaryDirectory(prefix="sidekey-checkov-") as tmp:
        for name, docs in rendered.items():
            Path(tmp, f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        # --skip-download: checkov would otherwise ask its vendor's API for guidelines.
        done = subprocess.run(
            [str(CHECKOV), "--skip-download", "--compact", "--framework", "kubernetes",
             "--output", "json", "--directory", tmp],
            capture_output=True, text=True, timeout=CHECKOV_SECONDS, check=False,
            env={**os.environ, "HOME": tmp},
        )  # fmt: skip
    assert done.stdout, done.stderr
    (report,) = (r for r in _as_list(json.loads(done.stdout)) if r["check_type"] == "kubernetes")
    results = report["results"]
    failed = [
        f"{c['check_id']} {c['check_name']} ({c['resource']}, {c['file_path']})"
        for c in results["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert report["summary"]["parsing_errors"] == 0
    assert len(results["passed_checks"]) > 300
    # The one check the chart skips, with its reason, and only while an image goes by tag.
    skipped = {(c["check_id"], c["resource"], c["check_result"]["suppress_comment"])
               for c in results["skipped_checks"]}  # fmt: skip
    assert {s[0] for s in skipped} == {"CKV_K8S_43"}
    assert all("image.digest" in reason for _, _, reason in skipped)
    pinned = rendered["gateway-hostpath-audit-volume"]
    assert "annotations" not in find(pinned, "Deployment")["metadata"]


def _as_list(value: Any) -> list[dict[str, Any]]:
    return value if isinstance(value, list) else [value]


# ------------------------------------------------------------------------ the sidecar example


def test_sidecar_example_runs_the_broker_as_a_native_sidecar(rendered):
    docs = rendered["sidecar"]
    spec = pod_spec(docs)
    (sidecar,) = spec["initContainers"]
    assert sidecar["name"] == "sidekey"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    (app,) = spec["containers"]
    assert app["name"] == "orders"
    # The app shares the socket directory, and nothing of the broker's secrets or identity.
    app_mounts = {m["name"]: m["mountPath"] for m in app["volumeMounts"]}
    assert app_mounts["sidekey-sockets"] == "/run/sidekey"
    assert "vault-token" not in app_mounts
    assert "spiffe-workload-api" not in app_mounts
    url = next(e["value"] for e in app["env"] if e["name"] == "DATABASE_URL")
    assert "host=/run/sidekey" in url
    assert "password" not in url
    listen = config_of(docs)["services"][0]["listen"]
    assert listen == "unix:/run/sidekey/.s.PGSQL.5432"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_container_is_hardened(rendered, name: str):
    docs = rendered[name]
    spec = pod_spec(docs)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for container in containers(spec):
        sc = container["securityContext"]
        where = f"{name}: container {container['name']}"
        for key, want in HARDENED.items():
            assert sc.get(key) is want, f"{where}: {key}"
        assert sc["runAsNonRoot"] is True, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert sc.get("privileged") is not True, where
        uid = sc.get("runAsUser", pod.get("runAsUser"))
        assert isinstance(uid, int) and uid >= 10000, where
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_no_secret_and_no_vault_token(rendered, name: str):
    docs = rendered[name]
    assert not [d for d in docs if d["kind"] == "Secret"]
    text = yaml.safe_dump_all(docs)
    assert "VAULT_TOKEN" not in text
    assert "token_env" not in text
    auth = config_of(docs)["vault"]["auth"]
    assert auth["method"] in ("jwt", "kubernetes")
    # The broker's token for Vault is the kubelet's projected service-account token.
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "vault-token")
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "vault"
    broker = _broker(docs)
    mount = next(m for m in broker["volumeMounts"] if m["name"] == "vault-token")
    assert mount["readOnly"] is True
    assert auth["token_file"] == f"{mount['mountPath']}/{source['serviceAccountToken']['path']}"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_chart_owned_keys_match_the_pod(rendered, name: str):
    docs = rendered[name]
    config = config_of(docs)
    spec = pod_spec(docs)
    broker = _broker(docs)
    mounts = {m["name"]: m for m in broker["volumeMounts"]}
    # The Workload API socket is where the SPIFFE volume is mounted.
    socket_dir = mounts["spiffe-workload-api"]["mountPath"]
    assert config["identity"]["workload_api"] == f"unix://{socket_dir}/spire-agent.sock"
    volume = next(v for v in spec["volumes"] if v["name"] == "spiffe-workload-api")
    if "csi" in volume:
        assert volume["csi"] == {"driver": "csi.spiffe.io", "readOnly": True}
    else:
        assert volume["hostPath"] == {"path": "/run/spire/agent-sockets", "type": "Directory"}
    # The config is the ConfigMap at /etc/sidekey, as the command line says.
    assert mounts["sidekey-config"]["mountPath"] == "/etc/sidekey"
    assert broker["args"][:3] == ["run", "--config", "/etc/sidekey/sidekey.yaml"]
    # admin.listen is the port the probes and the scrape use.
    port = next(p["containerPort"] for p in broker["ports"] if p["name"] == "admin")
    assert config["admin"]["listen"] == f"0.0.0.0:{port}"
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):  # fmt: skip
        assert broker[probe]["httpGet"] == {"path": path, "port": "admin"}
    # The audit trail: standard output, or a file on the audit volume.
    if "audit" in mounts:
        assert config["audit"] == {"file": f"{mounts['audit']['mountPath']}/audit.jsonl"}
        assert mounts["audit"]["subPathExpr"] == "$(POD_NAME)"
    else:
        assert "audit" not in config


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_drain_matches_the_grace_period(rendered, name: str):
    docs = rendered[name]
    spec = pod_spec(docs)
    broker = _broker(docs)
    sleep = broker["lifecycle"]["preStop"]["sleep"]["seconds"]
    args = broker["args"]
    drain = float(args[args.index("--drain-timeout") + 1])
    assert drain >= 10
    # preStop, then the drain, then revoking the leases and flushing the audit trail.
    assert spec["terminationGracePeriodSeconds"] >= sleep + drain + 5


def test_config_change_rolls_the_pods(helm: Helm):
    def checksum(*values: Any) -> str:
        docs = helm.template("examples/gateway.yaml", *values)
        annotations = find(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/config"])

    before = checksum()
    assert before == checksum({"gateway": {"replicas": 5}})
    changed = _gateway_config(helm)
    changed["services"][0]["allow"] = ["spiffe://example.org/ns/prod/sa/other"]
    assert before != checksum({"config": changed})


def _gateway_config(helm: Helm) -> dict[str, Any]:
    data = yaml.safe_load((CHART / "examples" / "gateway.yaml").read_text())
    config = data["config"]
    assert isinstance(config, dict)
    return config


def _broker(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(c for c in containers(pod_spec(docs)) if c["name"] == "sidekey")


# ------------------------------------------------------------------------------- the gateway


def test_gateway_has_a_service_per_listener(rendered):
    docs = rendered["gateway"]
    config = config_of(docs)
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    broker = _broker(docs)
    ports = {p["name"]: p["containerPort"] for p in broker["ports"]}
    for i, service in enumerate(config["services"]):
        port = int(service["listen"].rsplit(":", 1)[1])
        svc = services[f"sk-sidekey-{service['name']}"]
        (sp,) = svc["spec"]["ports"]
        assert sp["port"] == port
        assert ports[sp["targetPort"]] == port
        assert sp["targetPort"] == f"listen-{i}"
        assert (
            svc["spec"]["selector"] == find(docs, "Deployment")["spec"]["selector"]["matchLabels"]
        )
    assert "sk-sidekey-admin" in services  # for the ServiceMonitor, headless
    assert services["sk-sidekey-admin"]["spec"]["clusterIP"] == "None"


def test_gateway_replicas_pdb_and_hpa(rendered):
    docs = rendered["gateway"]
    deployment = find(docs, "Deployment")
    # With the HPA on, the Deployment leaves replicas to it (an upgrade would reset them).
    assert "replicas" not in deployment["spec"]
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    fixed = find(rendered["gateway-hostpath-audit-volume"], "Deployment")
    assert fixed["spec"]["replicas"] == 3
    assert not [
        d
        for d in rendered["gateway-hostpath-audit-volume"]
        if d["kind"] == "HorizontalPodAutoscaler"
    ]
    image = _broker(rendered["gateway-hostpath-audit-volume"])["image"]
    assert image == "sidekey@sha256:" + "0" * 64


def test_network_policy(rendered):
    docs = rendered["gateway"]
    policy = find(docs, "NetworkPolicy")["spec"]
    assert (
        policy["podSelector"]["matchLabels"]
        == find(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    )
    assert policy["policyTypes"] == ["Ingress"]
    listeners, admin = policy["ingress"]
    values = yaml.safe_load((CHART / "examples" / "gateway.yaml").read_text())
    assert listeners["from"] == values["networkPolicy"]["clients"]
    assert {p["port"] for p in listeners["ports"]} == {15432, 18443}
    assert admin["from"] == values["networkPolicy"]["metrics"]
    assert admin["ports"] == [{"port": 9901, "protocol": "TCP"}]

    # Sidecar: the listeners are local to the pod; only the scrape reaches the admin port,
    # and the app's own ingress rules come from app.ingress.
    sidecar = find(rendered["sidecar"], "NetworkPolicy")["spec"]
    assert [r["ports"] for r in sidecar["ingress"]] == [[{"port": 9901, "protocol": "TCP"}]]
    extra = find(rendered["sidecar-egress-and-app-ingress"], "NetworkPolicy")["spec"]
    assert extra["policyTypes"] == ["Ingress", "Egress"]
    assert extra["ingress"][0] == {"ports": [{"port": 8080}]}


def test_resources_have_requests_and_limits(rendered):
    for name, docs in rendered.items():
        for container in containers(pod_spec(docs)):
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{name}: {container['name']}"


# ---------------------------------------------------------------------- what the chart refuses


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # values.schema.json: the values' shape, with the path of what is wrong.
        ({"mode": "daemonset"}, "at '/mode': value must be one of 'gateway', 'sidecar'"),
        ({"gatway": {"replicas": 3}}, "additional properties 'gatway' not allowed"),
        ({"image": {"digest": "abc"}}, "at '/image/digest': 'abc' does not match pattern"),
        ({"vault": {"tokenExpirationSeconds": 60}}, "at '/vault/tokenExpirationSeconds'"),
        # The templates: what only makes sense together.
        ({"spiffe": {"source": "file"}}, "spiffe.source: must be csi or hostPath"),
        ({"config": {"version": 1, "audit": {"file": "/x"}, "services": []}}, "config.audit"),
        (
            {"config": {"version": 1, "admin": {"listen": "127.0.0.1:1"}, "services": []}},
            "config.admin.listen: the chart sets it to 0.0.0.0:9901",
        ),
        (
            {
                "config": {
                    "version": 1,
                    "identity": {"workload_api": "unix:///x.sock"},
                    "services": [],
                }
            },
            "config.identity.workload_api: the chart sets it to unix:///run/spire/agent-sockets/spire-agent.sock",
        ),
        (
            {
                "config": {
                    "version": 1,
                    "vault": {"auth": {"method": "jwt", "token_file": "/t"}},
                    "services": [],
                }
            },
            "config.vault.auth.token_file: the chart mounts the projected service-account token",
        ),
    ],
)
def test_refused_values(helm: Helm, values: dict[str, Any], message: str):
    assert message in helm.template_error(values)


def test_gateway_refuses_local_and_unreachable_listeners(helm: Helm):
    config = _gateway_config(helm)
    config["services"][0]["listen"] = "127.0.0.1:15432"
    err = helm.template_error("examples/gateway.yaml", {"config": config})
    assert "config.services[0].listen: 127.0.0.1:15432 is not reachable by other pods" in err
    config["services"][0]["listen"] = "0.0.0.0:15432"
    config["services"][0]["client_auth"] = "local"
    err = helm.template_error("examples/gateway.yaml", {"config": config})
    assert "config.services[0].client_auth: local is for a sidecar" in err


def test_sidecar_refuses_a_listener_outside_the_pod(helm: Helm):
    data = yaml.safe_load((CHART / "examples" / "sidecar.yaml").read_text())
    config = data["config"]
    config["services"][0]["listen"] = "0.0.0.0:5432"
    err = helm.template_error("examples/sidecar.yaml", {"config": config})
    assert "config.services[0].listen: 0.0.0.0:5432 would be reachable from outside the pod" in err
    config["services"][0]["listen"] = "unix:/var/run/other/.s.PGSQL.5432"
    err = helm.template_error("examples/sidecar.yaml", {"config": config})
    assert "not in sidecar.socketDir (/run/sidekey)" in err
    config["services"][0]["listen"] = "127.0.0.1:5432"  # loopback is the pod's own
    helm.template("examples/sidecar.yaml", {"config": config})


def test_sidecar_without_containers_is_refused(helm: Helm):
    err = helm.template_error("examples/sidecar.yaml", {"app": {"containers": []}})
    assert "app.containers: mode: sidecar renders the application's pod" in err


def test_namespace_is_the_release_namespace(helm: Helm):
    docs = helm.template("examples/gateway.yaml", namespace="payments")
    assert {d["metadata"]["namespace"] for d in docs} == {"payments"}
    assert NAMESPACE != "payments"
