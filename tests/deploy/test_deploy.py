"""Deployment files: Kubernetes manifests against the bundled Kubernetes JSON schemas (offline,
``kubernetes-validate``), compose files, and a docker build where a docker engine runs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = sorted((ROOT / "docker" / "k8s").glob("*.yaml"))
K8S_VERSION = "1.33.0"


@pytest.mark.parametrize("path", K8S, ids=[p.name for p in K8S])
def test_manifest_is_valid_kubernetes(path):
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on an unknown or mistyped field


def test_the_validator_catches_a_mistake():
    import kubernetes_validate

    dep = next(d for d in yaml.safe_load_all((ROOT / "docker" / "k8s" / "deployment.yaml").read_text()) if d)
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_manifests_fit_together():
    docs = {d["kind"]: d for p in K8S for d in yaml.safe_load_all(p.read_text()) if d}
    dep, svc, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e["value"] for e in c["env"]}
    from saesteer.server.config import ServerSettings

    for name in env:  # every variable names a real setting
        assert name.removeprefix("SAESTEER_").lower() in ServerSettings.model_fields, name
    drain = float(env["SAESTEER_DRAIN_TIMEOUT"])
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain + 10


@pytest.mark.parametrize("name", ["compose.yaml", "compose.cpu.yaml"])
def test_compose_files_point_at_real_dockerfiles(name):
    doc = yaml.safe_load((ROOT / "docker" / name).read_text())
    build = doc["services"]["saesteer"]["build"]
    assert (ROOT / "docker" / build["context"] / build["dockerfile"]).is_file()
    assert doc["services"]["saesteer"]["init"] is True


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_images_run_under_an_init(dockerfile):
    text = (ROOT / "docker" / dockerfile).read_text()
    assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in text and "tini" in text.split("ENTRYPOINT")[0]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_images_copy_every_package_folder(dockerfile):
    """Every folder pyproject maps to a package (``package-dir``) is copied into the image."""
    import re

    line = next(x for x in (ROOT / "pyproject.toml").read_text().splitlines() if x.startswith("package-dir"))
    folders = set(re.findall(r'= "([^"]+)"', line))  # tomllib would need Python 3.11; we support 3.10
    assert {"sae", "steering", "server", "modeling", "data"} <= folders
    text = (ROOT / "docker" / dockerfile).read_text()
    assert all(f"COPY {f} ./{f}" in text for f in folders), folders


def _docker_ok() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _docker_ok(), reason="no docker engine here")
def test_cpu_image_builds_and_serves():
    tag = "saesteer:test-cpu"
    subprocess.run(["docker", "build", "-f", "docker/Dockerfile.cpu", "-t", tag, "."], cwd=ROOT, check=True)
    cid = subprocess.run(["docker", "run", "-d", "-p", "127.0.0.1::8000", tag], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        import time

        import httpx

        port = subprocess.run(["docker", "port", cid, "8000"], capture_output=True, text=True, check=True).stdout.split(":")[-1].strip()
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "Hello", "max_new_tokens": 3}, timeout=60)
        assert r.status_code == 200, r.text
        t0 = time.time()
        subprocess.run(["docker", "stop", "-t", "40", cid], check=True)
        assert time.time() - t0 < 35  # SIGTERM through tini drains and exits, no kill after the grace
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
