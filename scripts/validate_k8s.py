#!/usr/bin/env python3
"""Validates custom resources (arl.infra.io) against the generated CRD schemas.

Usage: validate_k8s.py CRD_DIR MANIFEST...   (multi-document YAML files)

A Kubernetes structural schema is OpenAPI 3.0 with extensions; it becomes JSON Schema by
turning `nullable: true` into a null-admitting type, dropping `x-kubernetes-*` keys, mapping
`x-kubernetes-int-or-string` and `x-kubernetes-preserve-unknown-fields`, and closing every
object with `additionalProperties: false` (the API server prunes or, with strict field
validation, rejects unknown fields). CEL rules are checked by the Rust tests (`validate_cel`).
"""

import copy
import sys
from pathlib import Path

import jsonschema
import yaml

GROUP = "arl.infra.io"


def to_json_schema(node):
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    preserve = node.pop("x-kubernetes-preserve-unknown-fields", False)
    int_or_string = node.pop("x-kubernetes-int-or-string", False)
    nullable = node.pop("nullable", False)
    for key in [k for k in node if k.startswith("x-kubernetes-")]:
        del node[key]
    out = {k: to_json_schema(v) for k, v in node.items()}
    if int_or_string:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("type") == "object" and "additionalProperties" not in out:
        out["additionalProperties"] = bool(preserve) or "properties" not in out
    if nullable:
        if "type" in out:
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def load_schemas(crd_dir):
    schemas = {}
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            for version in doc["spec"]["versions"]:
                schema = to_json_schema(version["schema"]["openAPIV3Schema"])
                schema["properties"]["apiVersion"] = {"type": "string"}
                schema["properties"]["kind"] = {"type": "string"}
                schema["properties"]["metadata"] = {"type": "object"}
                schema.setdefault("required", [])
                schema["required"] = sorted(set(schema["required"]) | {"apiVersion", "kind", "metadata", "spec"})
                api_version = f"{doc['spec']['group']}/{version['name']}"
                schemas[(api_version, doc["spec"]["names"]["kind"])] = schema
    return schemas


def errors_of(schemas, doc):
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in schemas:
        return [f"no CRD for {key}"]
    validator = jsonschema.Draft4Validator(schemas[key])
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    schemas = load_schemas(sys.argv[1])
    if len(schemas) < 4:
        print(f"validate_k8s: only {len(schemas)} CRDs found in {sys.argv[1]}", file=sys.stderr)
        return 1
    failed = checked = 0
    samples = {}
    for name in sys.argv[2:]:
        for doc in yaml.safe_load_all(Path(name).read_text()):
            if not doc or not str(doc.get("apiVersion", "")).startswith(GROUP + "/"):
                continue
            checked += 1
            samples.setdefault(doc["kind"], doc)
            for error in errors_of(schemas, doc):
                failed += 1
                print(f"{name}: {doc['kind']}/{doc['metadata'].get('name')}: {error}", file=sys.stderr)
    # The check must be able to fail: a typo'd field and a wrong type are rejected.
    for kind, doc in samples.items():
        broken = copy.deepcopy(doc)
        broken["spec"]["replicaz"] = 1
        if not errors_of(schemas, broken):
            print(f"validate_k8s: an unknown field in a {kind} was not caught", file=sys.stderr)
            failed += 1
    if "WarmPool" in samples:
        broken = copy.deepcopy(samples["WarmPool"])
        broken["spec"]["replicas"] = "ten"
        if not errors_of(schemas, broken):
            print("validate_k8s: a string replicas was not caught", file=sys.stderr)
            failed += 1
    if checked == 0:
        print("validate_k8s: no custom resource found", file=sys.stderr)
        return 1
    print(f"validate_k8s: {checked} custom resources valid against {len(schemas)} CRD schemas" if not failed else f"validate_k8s: {failed} problem(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
