"""The chart's README is generated from values.yaml and documents every documented value."""
from __future__ import annotations

import importlib.util
from pathlib import Path

CHART = Path(__file__).resolve().parents[2] / "charts" / "emailqueue-operator"


def _readme_module():
    spec = importlib.util.spec_from_file_location("chart_readme", CHART / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chart_readme_is_in_sync_with_values():
    assert (CHART / "README.md").read_text(encoding="utf-8") == _readme_module().render(), \
        "charts/emailqueue-operator/README.md is stale: run make manifests"


def test_every_documented_value_has_a_row():
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    keys = _readme_module().documented_keys(text)
    documented = sum(1 for line in text.splitlines() if line.strip().startswith("# --"))
    assert len(keys) == documented > 50
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    for dotted, _ in keys:
        assert f"| `{dotted}` |" in readme
