"""Conformance with upstream: the HPA's and KEDA's own test tables, rewritten as our tables."""
