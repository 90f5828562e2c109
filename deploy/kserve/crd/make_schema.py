"""Extract the part of KServe's InferenceService CRD that validates our manifests.

    python deploy/kserve/crd/make_schema.py serving.kserve.io_inferenceservices.yaml

The full CRD (``config/crd/full/serving.kserve.io_inferenceservices.yaml`` in the
kserve/kserve repository) is about 2 MB, nearly all of it descriptions. This keeps the
v1beta1 ``openAPIV3Schema`` with ``spec.predictor`` and ``spec.transformer`` (the parts
our manifests use), drops every ``description`` (which validates nothing), and writes it
gzipped beside this script. ``tests/test_deploy_manifests.py`` validates against it.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).with_name("inferenceservice-v1beta1.schema.json.gz")
KEPT_COMPONENTS = ("predictor", "transformer")


def without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def extract(crd: dict[str, Any]) -> dict[str, Any]:
    """The v1beta1 schema, its spec cut down to the kept components."""
    (version,) = (v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    schema = version["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    spec = {**spec, "properties": {k: spec["properties"][k] for k in KEPT_COMPONENTS}}
    props = {k: schema["properties"][k] for k in ("apiVersion", "kind", "metadata")}
    return without_descriptions({**schema, "properties": {**props, "spec": spec}})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="serving.kserve.io_inferenceservices.yaml")
    parser.add_argument("--source", default="", help="where the CRD came from (recorded)")
    args = parser.parse_args(argv)
    crd = yaml.safe_load(args.crd.read_text())
    doc = {"source": args.source, "schema": extract(crd)}
    data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    OUT.write_bytes(gzip.compress(data, mtime=0))
    print(f"wrote {OUT} ({len(data)} bytes of JSON)")


if __name__ == "__main__":
    main()
