"""deploy/: the Kubernetes example is consistent with run.sh. run.sh handing REDIS_URL to one
process: tests/e2e/test_deploy.py."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def manifests() -> dict[str, dict]:
    docs = [
        d for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d
    ]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_kubernetes_example_runs_one_worker_per_pod_behind_its_service():
    m = manifests()
    deployment, service = m["Deployment/llm-gateway"], m["Service/llm-gateway"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GATEWAY_WORKERS"] == "1" and env["GATEWAY_HOST"] == "0.0.0.0"
    # the Service selects the pods and reaches the port the gateway listens on
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[service["spec"]["ports"][0]["targetPort"]] == int(env["GATEWAY_PORT"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    # limits shared in the Redis the example deploys; the ledger in PostgreSQL, no password in the URL
    redis = urlsplit(env["REDIS_URL"])
    assert f"Service/{redis.hostname}" in m and m[f"Service/{redis.hostname}"]["spec"]["ports"][0]["port"] == redis.port
    assert "--appendonly" in m[f"StatefulSet/{redis.hostname}"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert urlsplit(env["USAGE_DB"]).scheme == "postgresql" and urlsplit(env["USAGE_DB"]).password is None
    assert any(
        e["name"] == "PGPASSWORD" and "secretKeyRef" in e["valueFrom"] for e in container["env"] if "valueFrom" in e
    )
    # the drain: the pod keeps serving through preStop, then drains GATEWAY_DRAIN_S, within the grace period
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert 0 < sleep and sleep + float(env["GATEWAY_DRAIN_S"]) < pod["terminationGracePeriodSeconds"]
    # the image starts run.sh with the keys file the Secret is mounted at
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["./run.sh"]' in dockerfile
    [mount] = container["volumeMounts"]
    assert Path(env["KEYS_FILE"]).parent == Path(mount["mountPath"])
