"""deploy/kubernetes/fleet (README "Running a fleet"), validated offline: every object
against the Kubernetes API's schemas (strict), and the objects against each other and
``ringproxy check``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.config import parse_config
from tests.conftest import ROOT, cli

DIR = ROOT / "deploy/kubernetes/fleet"
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(DIR.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    kinds = []
    for doc in documents():
        if doc["kind"] == "Kustomization":
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Deployment",
                             "PersistentVolumeClaim", "PodDisruptionBudget", "Service",
                             "Service", "Service"]


def test_the_kustomization_lists_every_file() -> None:
    (kustomization,) = [d for d in documents() if d["kind"] == "Kustomization"]
    files = sorted(p.name for p in DIR.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files


def test_the_replicas_share_one_redis_and_keep_serving_without_it(tmp_path: Path) -> None:
    deployment = one("Deployment", "ringproxy-fleet")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["REDIS_URL"]["name"] == "ringproxy-redis"  # a Secret: it holds a password
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for service in ("ringproxy-fleet", "ringproxy-fleet-admin"):
        assert matches(one("Service", service)["spec"]["selector"], pod["metadata"]["labels"])
    budget = one("PodDisruptionBudget", "ringproxy-fleet")
    assert matches(budget["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "ringproxy-fleet-config"

    text = one("ConfigMap", "ringproxy-fleet-config")["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    done = cli("check", "--env-optional", str(path))
    assert done.returncode == 0, done.stderr
    config = parse_config(text, environ={"RINGPROXY_ADMIN_TOKEN": "x" * 32,
                                         "REDIS_URL": "redis://:pw@ringproxy-redis:6379/0"})
    redis = config.state.backend
    assert redis is not None and redis.lease == 3.0
    assert redis.redacted_url == "redis://ringproxy-redis:6379/0"

    redis = one("Deployment", "ringproxy-redis")["spec"]["template"]
    redis_service = one("Service", "ringproxy-redis")
    assert matches(redis_service["spec"]["selector"], redis["metadata"]["labels"])
    assert redis_service["spec"]["ports"][0]["port"] == 6379
    (server,) = redis["spec"]["containers"]
    assert "--appendonly" in server["args"]  # a restart keeps the agreed state
    args = server["args"]
    assert args[args.index("--appendfsync") + 1] == "always"  # an acknowledged write stays
    # The password from a config file in the Secret, never in args or the environment
    # (both show in the process list or the pod spec).
    assert "--requirepass" not in args and "env" not in server
    assert args[0] == "/etc/redis/redis.conf"
    mount = next(m for m in server["volumeMounts"] if m["mountPath"] == "/etc/redis")
    volume = next(v for v in redis["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "ringproxy-redis"
    assert volume["secret"]["items"] == [{"key": "redis.conf", "path": "redis.conf"}]
