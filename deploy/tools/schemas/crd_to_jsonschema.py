"""Turn CustomResourceDefinition YAML files into strict JSON Schemas for offline validation.

    python deploy/tools/schemas/crd_to_jsonschema.py CRD.yaml... [--out deploy/tools/schemas/crds]

Writes ``<group>/<kind>_<version>.json`` (lower-case kind): the layout of the community CRDs
catalog, which kubeconform reads with
``-schema-location 'DIR/{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json'``. The
chart's custom resources (ServiceMonitor, PrometheusRule, ScaledObject, TriggerAuthentication) are
validated against these files, because nothing can be downloaded at test time.

"Strict" means: every object schema that lists its ``properties`` and neither sets
``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields`` rejects unknown keys. The API
server would silently prune such keys, so a misspelt field in a template would otherwise pass
validation and then quietly do nothing in the cluster.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml


def strict(schema: Any) -> Any:
    """A copy of ``schema`` in which objects with known properties refuse unknown ones."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def main() -> None:
    """Convert each served version of each CRD given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crds", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "crds")
    args = parser.parse_args()
    for path in args.crds:
        crd = yaml.safe_load(path.read_text())
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"].lower()
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            schema = strict(version["schema"]["openAPIV3Schema"])
            target = args.out / group / f"{kind}_{version['name']}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
            print(target)


if __name__ == "__main__":
    main()
