"""Emailqueue-operator: queue-driven, SLO-aware autoscaling of email workers."""

__version__ = "0.2.0"
