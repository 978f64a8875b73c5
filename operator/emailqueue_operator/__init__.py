"""Emailqueue-operator: queue-driven, SLO-aware autoscaling of email workers."""

__version__ = "0.1.0"
