"""deploy/kubernetes, validated offline: every object against the Kubernetes API's
OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), and the objects against
each other, the Dockerfile, README and ``ringproxy check`` (no cluster needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.config import parse_config
from tests.conftest import ROOT, cli

DIR = ROOT / "deploy/kubernetes"
# The oldest Kubernetes the manifests promise (preStop sleep is on by default from 1.30)
# and the newest kubernetes-validate knows.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in documents() if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    checked = []
    for _, doc in documents():
        if doc["kind"] in ("Kustomization", "ServiceMonitor"):  # no schema: checked below
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(doc["kind"])
    assert sorted(checked) == ["ConfigMap", "Deployment", "PersistentVolumeClaim",
                               "PodDisruptionBudget", "Service", "Service"]


def test_the_kustomization_lists_every_file() -> None:
    kustomization = one("Kustomization")
    files = sorted(p.name for p in DIR.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files


def test_the_objects_fit_together() -> None:
    deployment = one("Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], labels)
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for service in (one("Service", "ringproxy"), one("Service", "ringproxy-admin")):
        assert matches(service["spec"]["selector"], labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert matches(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    claim = volumes["state"]["persistentVolumeClaim"]["claimName"]
    assert claim == one("PersistentVolumeClaim")["metadata"]["name"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert "subPath" not in mounts["config"]  # a subPath mount never sees updates
    monitor = one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    admin_service = one("Service", "ringproxy-admin")
    assert matches(monitor["spec"]["selector"]["matchLabels"],
                   admin_service["metadata"]["labels"])
    assert not matches(monitor["spec"]["selector"]["matchLabels"],
                       one("Service", "ringproxy")["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in admin_service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_the_pod_runs_as_the_image_and_readme_say() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert uid is not None
    assert pod["securityContext"]["runAsUser"] == int(uid.group(1))
    assert pod["securityContext"]["runAsGroup"] == int(uid.group(2))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/etc/ringproxy", "/var/lib/ringproxy"} <= mounts
    assert container["args"] == ["run", "--config", "/etc/ringproxy/config.yaml"]
    assert "resources" in container and container["resources"]["limits"]["memory"]


def test_the_configmaps_config_passes_check_and_listens_where_the_pod_expects(
    tmp_path: Path,
) -> None:
    text = one("ConfigMap")["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    done = cli("check", "--env-optional", str(path))
    assert done.returncode == 0, done.stderr
    # the one unset variable is the token the Deployment takes from its Secret
    assert "environment variable RINGPROXY_ADMIN_TOKEN is not set" in done.stderr
    container = one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"] for e in container["env"]}
    assert "RINGPROXY_ADMIN_TOKEN" in env
    config = parse_config(text, environ={"RINGPROXY_ADMIN_TOKEN": "x" * 32})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", ports["http"])
    assert (config.admin.listen.host, config.admin.listen.port) == ("0.0.0.0", ports["admin"])
    assert config.admin.tokens, "an admin listener on the pod's address needs tokens"
    assert Path(config.state.path).parent == Path("/var/lib/ringproxy")
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert "lifecycle" not in container, "no preStop pause: ringproxy drains on SIGTERM"
    assert grace > config.drain_delay + config.shutdown_grace
