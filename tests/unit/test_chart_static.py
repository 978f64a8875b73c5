"""What ships must stay in step with its sources, and the chart's contract with users holds.

File-level checks, no cluster and no helm binary: the chart carries byte-identical copies of
the monitoring sources and the CRD as sync.py wraps it into a template; every value is documented
(`# --`) and described by a schema that rejects unknown keys; the two Kustomize trees reference
every manifest they hold; the images are multi-stage, pinned, and run as uid 65532.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "emailqueue-operator"
DEPLOY = REPO / "deploy"

# Schema nodes that pass a Kubernetes object through verbatim (its own API validates it).
PASSTHROUGH = {"/operator/affinity", "/worker/affinity", "/global",
               # security contexts: the fields values.yaml sets are typed, the rest (seLinuxOptions,
               # appArmorProfile, localhostProfile, capabilities.add ...) passes through to the API
               "/podSecurityContext", "/podSecurityContext/seccompProfile",
               "/securityContext", "/securityContext/seccompProfile", "/securityContext/capabilities"}


@pytest.mark.parametrize("source, copy", [
    (DEPLOY / "monitoring" / "rules" / "emailqueue.rules.yaml", CHART / "files" / "emailqueue.rules.yaml"),
], ids=["rules"])
def test_chart_copy_is_byte_identical(source: Path, copy: Path) -> None:
    assert copy.read_bytes() == source.read_bytes(), f"{copy} is stale: run `python deploy/monitoring/sync.py`"


def _sync_module():
    spec = importlib.util.spec_from_file_location("monitoring_sync", DEPLOY / "monitoring" / "sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHART_CRD = CHART / "templates" / "crds" / "emailqueue.dev_emailqueues.yaml"


def test_chart_crd_template_is_the_deploy_crd() -> None:
    """The templated CRD is deploy/crds' CRD, only its metadata rewritten (sync.py)."""
    sync = _sync_module()
    assert CHART_CRD.read_text(encoding="utf-8") == sync.crd_template(), \
        f"{CHART_CRD} is stale: run `python deploy/monitoring/sync.py`"
    source = yaml.safe_load((DEPLOY / "crds" / CHART_CRD.name).read_text(encoding="utf-8"))
    body = [line for line in CHART_CRD.read_text(encoding="utf-8").splitlines() if "{{" not in line]
    templated = yaml.safe_load("\n".join(body))
    assert templated["spec"] == source["spec"]
    assert templated["metadata"]["name"] == source["metadata"]["name"]
    assert templated["metadata"]["labels"]["app.kubernetes.io/component"] == "crd"


def _documented_leaves(lines: list[str]) -> list[tuple[str, bool]]:
    """(dotted key, documented) for every leaf of values.yaml; a `# --` comment on a key documents
    it and everything below it (helm-docs semantics)."""
    result: list[tuple[str, bool]] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    comment_block: list[str] = []
    keyed = [(i, line) for i, line in enumerate(lines)]
    for index, line in keyed:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment_block.append(stripped)
            continue
        if not stripped:
            comment_block = []
            continue
        match = re.match(r"^(\s*)([A-Za-z0-9_-]+):(.*)$", line)
        if not match:
            comment_block = []
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = any(c.startswith("# --") for c in comment_block) or any(doc for _, _, doc in stack)
        comment_block = []
        path = ".".join([k for _, k, _ in stack] + [key])
        following = next((candidate for candidate in lines[index + 1:] if candidate.strip()
                          and not candidate.strip().startswith("#")), "")
        is_section = rest == "" and (len(following) - len(following.lstrip())) > indent
        if is_section:
            stack.append((indent, key, documented))
        else:
            result.append((path, documented))
    return result


def test_every_value_is_documented() -> None:
    leaves = _documented_leaves((CHART / "values.yaml").read_text(encoding="utf-8").splitlines())
    assert len(leaves) > 30
    undocumented = [path for path, documented in leaves if not documented]
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def _schema_objects(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    types = node.get("type")
    if types == "object" or (isinstance(types, list) and "object" in types):
        found.append((path, node))
    for key, child in node.get("properties", {}).items():
        found.extend(_schema_objects(child, f"{path}/{key}"))
    if isinstance(node.get("items"), dict):
        found.extend(_schema_objects(node["items"], f"{path}[]"))
    if isinstance(node.get("additionalProperties"), dict):
        found.extend(_schema_objects(node["additionalProperties"], f"{path}/*"))
    return found


def test_schema_closes_every_object() -> None:
    """Structured objects reject unknown keys; maps type their values; only listed Kubernetes
    pass-through objects stay open."""
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    for path, node in _schema_objects(schema):
        if path in PASSTHROUGH or path.endswith("[]"):
            continue  # Kubernetes objects in lists (tolerations, env, peers) are validated by the API
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '/'} accepts unknown keys"
        else:
            assert isinstance(node.get("additionalProperties"), dict), f"{path} is an untyped open object"


def _schema_keys(node: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, child in node.get("properties", {}).items():
        keys.add(prefix + key)
        keys |= _schema_keys(child, f"{prefix}{key}.")
    return keys


def _value_keys(values: Any, prefix: str = "") -> set[str]:
    keys = set()
    if isinstance(values, dict):
        for key, child in values.items():
            keys.add(prefix + key)
            if isinstance(child, dict) and child:
                keys |= _value_keys(child, f"{prefix}{key}.")
    return keys


def test_schema_and_values_describe_the_same_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    in_values = _value_keys(values)
    in_schema = _schema_keys(schema) - {"global"}
    assert in_values - in_schema == set(), "values the schema would reject"
    # Schema-only keys are fine only below a free-form map (e.g. resources.requests.cpu).
    missing = {key for key in in_schema - in_values if not re.search(r"resources\.", key)}
    assert missing == set(), "schema keys without a documented default in values.yaml"


def test_chart_crd_upgrades_and_is_kept_on_uninstall() -> None:
    """The CRD is a template (crds/ is installed once and never upgraded by Helm), behind
    crds.install, with helm.sh/resource-policy: keep so uninstall keeps every EmailQueue;
    kubeVersion admits only clusters that run the CRD's CEL rules."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["apiVersion"] == "v2"
    assert chart["kubeVersion"] == ">=1.25.0-0"
    assert not (CHART / "crds").exists(), "crds/ is never upgraded by helm upgrade"
    text = CHART_CRD.read_text(encoding="utf-8")
    assert text.splitlines()[1] == "{{- if .Values.crds.install }}" and text.endswith("{{- end }}\n")
    assert "    helm.sh/resource-policy: keep\n" in text
    templates = [p for p in (CHART / "templates").rglob("*.yaml") if "CustomResourceDefinition" in p.read_text()]
    assert templates == [CHART_CRD]
    assert yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))["crds"]["install"] is True


def test_templates_take_the_security_context_from_values() -> None:
    """No UID is fixed in a template: OpenShift's restricted-v2 SCC must be able to assign its own
    (values-openshift.yaml nulls runAsUser, runAsGroup and fsGroup)."""
    for template in (CHART / "templates").rglob("*"):
        if template.is_file():
            text = template.read_text(encoding="utf-8")
            assert not re.search(r"65532|runAsUser|runAsGroup|fsGroup", text), f"{template.name} fixes a UID"
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert values["podSecurityContext"]["runAsUser"] == 65532, "the images' USER, by default"
    openshift = yaml.safe_load((CHART / "values-openshift.yaml").read_text(encoding="utf-8"))
    assert openshift == {"podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None}}


def _kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


@pytest.mark.parametrize("folder", _kustomization_dirs(), ids=lambda p: str(p.relative_to(DEPLOY)) or ".")
def test_kustomization_lists_every_manifest(folder: Path) -> None:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = {str(r).rstrip("/") for r in kustomization.get("resources", [])}
    for manifest in folder.glob("*.yaml"):
        if manifest.name == "kustomization.yaml":
            continue
        assert manifest.name in listed, f"{manifest.relative_to(REPO)} is not in its kustomization"
    for resource in listed:
        assert (folder / resource).exists(), f"{folder.relative_to(REPO)} lists missing {resource}"


@pytest.mark.parametrize("component", ["operator", "worker"])
def test_dockerfile_is_multistage_pinned_and_nonroot(component: str) -> None:
    text = (REPO / component / "Dockerfile").read_text(encoding="utf-8")
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base.group(1)), "pin python:3.11.x-slim by tag"
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2, "a builder stage and a final stage"
    builder, final = stages
    assert "pip wheel" in builder
    assert "COPY --from=build /opt/venv" in final
    assert not re.search(r"apt-get|gcc|build-essential|pip wheel", final), "no build tools in the final stage"
    assert re.search(r"^USER 65532(:65532)?$", final, re.M)
