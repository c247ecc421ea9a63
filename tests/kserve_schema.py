"""Validates KServe resources (ServingRuntime, InferenceService) offline.

KServe's CRD schemas are not bundled by any validator here, but KServe's Python SDK wheel ships
an OpenAPI model per type: `openapi_types` (field → type) and `attribute_map` (field → JSON
key). We read those from the wheel as data (ast, no import, none of its dependencies), check
every KServe object against them — unknown keys and wrong types are errors — and hand every
embedded Kubernetes type (V1Container, V1ObjectMeta, ...) to the Kubernetes JSON schemas that
kubernetes-validate bundles, in their strict form.
"""

from __future__ import annotations

import ast
import re
import zipfile
from functools import cached_property
from pathlib import Path
from typing import Any

import jsonschema
import referencing
from kubernetes_validate.utils import all_versions, schema_contents

WHEEL = Path(__file__).resolve().parent.parent / ".venv" / "share" / "pipeserve-test" / "kserve-0.21.0-py3-none-any.whl"
TOP_LEVEL = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}


class KServeSchema:
    def __init__(self, wheel: Path = WHEEL):
        self.models = self._read_models(wheel)

    @staticmethod
    def _read_models(wheel: Path) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
        """{class name: (openapi_types, attribute_map)} of every kserve/models/*.py in the wheel."""
        models = {}
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if not (name.startswith("kserve/models/") and name.endswith(".py")):
                    continue
                tree = ast.parse(archive.read(name))
                for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
                    tables = {}
                    for node in cls.body:
                        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and \
                                node.targets[0].id in ("openapi_types", "attribute_map"):
                            tables[node.targets[0].id] = ast.literal_eval(node.value)
                    if len(tables) == 2:
                        models[cls.name] = (tables["openapi_types"], tables["attribute_map"])
        if not models:
            raise ValueError(f"{wheel}: no OpenAPI models found")
        return models

    @cached_property
    def _kubernetes(self) -> tuple[dict[str, Any], referencing.Registry]:
        version = all_versions()[-1]  # e.g. "1.37.0", the newest bundled
        definitions = schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
        registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
        return definitions, registry

    def _kubernetes_definition(self, type_name: str) -> str:
        """V1Container → io.k8s.api.core.v1.Container; K8sIoApiAppsV1DeploymentStrategy → its own."""
        definitions, _ = self._kubernetes
        names = definitions["$defs"]
        if type_name.startswith("K8sIo"):  # k8s.io.api.apps.v1.DeploymentStrategy, spelled whole
            compact = type_name.lower()
            for name in names:
                if name.startswith("io.k8s.") and ("k8sio" + name[len("io.k8s."):]).replace(".", "").lower() == compact:
                    return name
            raise KeyError(type_name)
        match = re.fullmatch(r"(V\d+(?:alpha\d+|beta\d+)?)(\w+)", type_name)
        if not match:
            raise KeyError(type_name)
        suffix = f".{match.group(1).lower()}.{match.group(2)}"
        found = sorted((n for n in names if n.endswith(suffix)), key=lambda n: (not n.startswith("io.k8s.api.core"), n))
        if not found:
            raise KeyError(type_name)
        return found[0]

    def validate(self, document: dict[str, Any]) -> None:
        """Raises ValueError naming each path that does not fit KServe's types."""
        key = (document.get("apiVersion"), document.get("kind"))
        if key not in TOP_LEVEL:
            raise ValueError(f"not a KServe resource this validator knows: {key}")
        errors: list[str] = []
        self._check(document, TOP_LEVEL[key], "$", errors)
        if errors:
            raise ValueError("\n".join(errors))

    def _check(self, value: Any, type_name: str, path: str, errors: list[str]) -> None:
        if value is None:
            return
        if type_name == "object":
            return
        if type_name in PRIMITIVES:
            ok = isinstance(value, PRIMITIVES[type_name]) and not (type_name != "bool" and isinstance(value, bool))
            if not ok:
                errors.append(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
            return
        if type_name == "ResourceQuantity":
            if not isinstance(value, (str, int, float)):
                errors.append(f"{path}: expected a quantity, got {value!r}")
            return
        list_of = re.fullmatch(r"list\[(.+)\]", type_name)
        if list_of:
            if not isinstance(value, list):
                errors.append(f"{path}: expected a list, got {value!r}")
                return
            for i, item in enumerate(value):
                self._check(item, list_of.group(1), f"{path}[{i}]", errors)
            return
        dict_of = re.fullmatch(r"dict\(str, (.+)\)", type_name)
        if dict_of:
            if not isinstance(value, dict):
                errors.append(f"{path}: expected a mapping, got {value!r}")
                return
            for key, item in value.items():
                self._check(item, dict_of.group(1), f"{path}.{key}", errors)
            return
        if type_name in self.models:
            types, keys = self.models[type_name]
            if not isinstance(value, dict):
                errors.append(f"{path}: expected a {type_name} mapping, got {value!r}")
                return
            by_key = {json_key: attr for attr, json_key in keys.items()}
            for key, item in value.items():
                if key not in by_key:
                    errors.append(f"{path}.{key}: unknown field of {type_name}; allowed: {', '.join(sorted(by_key))}")
                    continue
                self._check(item, types[by_key[key]], f"{path}.{key}", errors)
            return
        self._check_kubernetes(value, type_name, path, errors)

    def _check_kubernetes(self, value: Any, type_name: str, path: str, errors: list[str]) -> None:
        try:
            definition = self._kubernetes_definition(type_name)
        except KeyError:
            errors.append(f"{path}: no schema for type {type_name}")
            return
        _, registry = self._kubernetes
        schema = {"$ref": f"https://kubernetes.io/api/_definitions.json#/$defs/{definition}"}
        validator = jsonschema.Draft202012Validator(schema, registry=registry)
        for error in validator.iter_errors(value):
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
            errors.append(f"{path}{where}: {error.message}")
