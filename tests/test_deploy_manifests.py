"""The deployment files validate and agree with each other and with the image.

Core kinds go through ``kubernetes-validate`` (the Kubernetes API's own OpenAPI schemas,
strict: unknown fields fail); InferenceServices through KServe's CRD schema
(``deploy/kserve/crd``), made strict the same way. No cluster runs here: what a cluster
would add (admission webhooks, the KServe controller's defaulting) is not tested.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy_image import ROOT, dockerfile_instructions, image_command

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)"
)
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (dev extra)")

K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"
KSERVE_DIR = ROOT / "deploy" / "kserve"
ISVC_SCHEMA = KSERVE_DIR / "crd" / "inferenceservice-v1beta1.schema.json.gz"


def documents(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return found


def by_kind(kind: str, folder: Path = KUBERNETES_DIR) -> dict[str, Any]:
    (doc,) = (d for _, d in documents(folder) if d["kind"] == kind)
    return doc


def strict(schema: Any) -> Any:
    """A CRD schema that rejects unknown fields, as ``kubectl apply --validate=strict``.

    Objects that list their properties get ``additionalProperties: false`` unless they
    preserve unknown fields (``metadata`` and free-form maps list none, and stay open).
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@pytest.fixture(scope="module")
def isvc_validator() -> Any:
    doc = json.loads(gzip.decompress(ISVC_SCHEMA.read_bytes()))
    assert doc["source"].startswith("kserve/kserve@"), doc["source"]
    return jsonschema.Draft7Validator(strict(doc["schema"]))


def test_every_file_is_checked_here() -> None:
    kinds = {d["kind"] for _, d in documents(KUBERNETES_DIR) + documents(KSERVE_DIR)}
    expected = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    assert kinds == expected | {"ConfigMap", "InferenceService"}


@pytest.mark.parametrize(
    ("name", "doc"), documents(KUBERNETES_DIR), ids=lambda v: v if isinstance(v, str) else ""
)
def test_core_kinds_validate(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_core_validator_rejects_an_unknown_field() -> None:
    broken = copy.deepcopy(by_kind("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", ["inferenceservice.yaml", "split-inferenceservice.yaml"])
def test_inference_services_validate_against_kserve_crd(name: str, isvc_validator) -> None:
    (doc,) = yaml.safe_load_all((KSERVE_DIR / name).read_text())
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in isvc_validator.iter_errors(doc)]
    assert not errors, errors
    for component in ("predictor", "transformer"):
        for container in doc["spec"].get(component, {}).get("containers", []):
            # The containers are Pod containers: the core schema checks them too.
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}
            pod["spec"] = {"containers": [container]}
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_the_crd_validator_rejects_an_unknown_field(isvc_validator) -> None:
    (doc,) = yaml.safe_load_all((KSERVE_DIR / "inferenceservice.yaml").read_text())
    doc["spec"]["predictor"]["minReplica"] = 1
    assert list(isvc_validator.iter_errors(doc))
    del doc["spec"]["predictor"]
    assert list(isvc_validator.iter_errors(doc))  # the predictor is required


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def pod_specs() -> list[tuple[str, dict[str, Any], list[str]]]:
    """(where, pod spec, the splitserve arguments it runs) for every splitserve pod."""
    image_args = image_command(ROOT / "Dockerfile")[2:]
    found = [("deployment", by_kind("Deployment")["spec"]["template"]["spec"], image_args)]
    for name in ("inferenceservice.yaml", "split-inferenceservice.yaml"):
        (doc,) = yaml.safe_load_all((KSERVE_DIR / name).read_text())
        predictor = doc["spec"]["predictor"]
        found.append((f"{name}:predictor", predictor, predictor["containers"][0]["args"]))
    return found


@pytest.mark.parametrize(("where", "pod", "args"), pod_specs(), ids=lambda v: str(v)[:40])
def test_pods_match_the_image_and_the_drain(where: str, pod: dict, args: list[str]) -> None:
    (container,) = pod["containers"]
    assert "command" not in container, "splitserve pods run the image's ENTRYPOINT"
    if container is by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]:
        assert "args" not in container, "the Deployment runs the image's CMD unchanged"
    drain = float(option(args, "--drain-timeout"))
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    # The drain must end before Kubernetes' SIGKILL, with 10 s for the processes to stop.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 10
    port = int(option(args, "--port"))
    declared = {p["containerPort"] for p in container["ports"]}
    assert declared == {port}
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] in (port, "http"), (probe, get)
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    user = dockerfile_instructions(ROOT / "Dockerfile")["USER"][-1]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(user)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "/tmp" in mounts  # the run directory, on a read-only root filesystem


def test_gpu_predictor_and_cpu_transformer_are_apart() -> None:
    (doc,) = yaml.safe_load_all((KSERVE_DIR / "split-inferenceservice.yaml").read_text())
    predictor, transformer = doc["spec"]["predictor"], doc["spec"]["transformer"]
    assert predictor["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in transformer["containers"][0]["resources"]["limits"]
    assert predictor["nodeSelector"] != transformer["nodeSelector"]
    container = transformer["containers"][0]
    assert container["command"] == ["python", "-m", "deploy.kserve.transformer"]
    assert (ROOT / "deploy" / "kserve" / "transformer.py").exists()
    args = container["args"]
    assert option(args, "--protocol") == "v2"
    assert option(args, "--host") == "0.0.0.0"  # in the pod; its default is 127.0.0.1
    assert option(args, "--service") == image_command(ROOT / "Dockerfile")[2]


def test_selectors_match_the_pods() -> None:
    labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert by_kind("Deployment")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert by_kind("Service")["spec"]["selector"].items() <= labels.items()
    pdb = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < by_kind("HorizontalPodAutoscaler")["spec"]["minReplicas"]
    target = by_kind("Service")["spec"]["ports"][0]["targetPort"]
    ports = by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert target in {p["name"] for p in ports}


def test_hpa_metric_is_what_the_adapter_rule_serves() -> None:
    hpa = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == by_kind("Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    rules = yaml.safe_load(by_kind("ConfigMap")["data"]["config.yaml"])["rules"]
    (rule,) = [r for r in rules if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # The series the rule reads are splitserve's Prometheus names (Triton's).
    # (with or without the _total suffix that Prometheus clients give counters)
    names = r'__name__=~"(nv_[a-z_]+)\(_total\)\?"'
    series = set(re.findall(names, rule["metricsQuery"]))
    assert series == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    assert re.findall(names, rule["seriesQuery"]) == ["nv_inference_queue_duration_us"]
    for name in ("nv_inference_queue_duration_us", "nv_inference_queue_duration_us_total"):
        assert re.fullmatch(rule["name"]["matches"], name)
