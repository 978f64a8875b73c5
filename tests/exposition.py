"""Reading Prometheus exposition text in tests, with prometheus_client's own parser.

A scrape is read the way Prometheus reads it (escaping, label order, `# TYPE` lines,
counters' `_total`), never with string splitting that a label value or a reordered label
would fool.
"""
from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

# Series a family of each type stores besides its samples' names (a labelled metric has no
# sample before its first observation, yet Prometheus knows it from the # TYPE line).
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count", "_created"),
                   "summary": ("", "_sum", "_count", "_created")}


def sample_values(text: str, name: str, labels: Mapping[str, str] | None = None) -> list[float]:
    """Values of the samples named `name` whose labels include `labels`, in scrape order."""
    wanted = dict(labels or {})
    return [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name and wanted.items() <= sample.labels.items()]


def series_names(text: str) -> set[str]:
    """Every series name a Prometheus server would store from this scrape."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SERIES_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names
