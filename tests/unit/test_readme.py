"""The EmailQueue the README shows is one the operator accepts."""
from __future__ import annotations

from pathlib import Path

import yaml

from emailqueue_operator.spec import parse_spec

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_emailqueue_parses():
    block = README.read_text().split("```yaml", 1)[1].split("```", 1)[0]
    doc = yaml.safe_load(block)
    assert doc["kind"] == "EmailQueue" and doc["apiVersion"] == "emailqueue.dev/v1alpha1"
    spec = parse_spec(doc["spec"])
    assert spec.target.drain_seconds == 60 and spec.replicas.min == 0
