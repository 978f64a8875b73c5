"""Conditions keep their transition time while unchanged and move it when they flip."""
from __future__ import annotations

from emailqueue_operator.conditions import Condition, merge


def test_transition_time_kept_while_status_unchanged():
    first = merge(None, [Condition("Ready", True, "Scaling", "ok")], "2026-01-01T00:00:00Z", 1)
    again = merge(first, [Condition("Ready", True, "Scaling", "still ok")], "2026-01-01T00:05:00Z", 2)
    assert again[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert again[0]["message"] == "still ok" and again[0]["observedGeneration"] == 2


def test_transition_time_moves_when_status_flips():
    first = merge(None, [Condition("Ready", True, "Scaling", "ok")], "2026-01-01T00:00:00Z", 1)
    flipped = merge(first, [Condition("Ready", False, "BrokerUnreachable", "down")], "2026-01-01T00:05:00Z", 1)
    assert flipped[0] == {"type": "Ready", "status": "False", "reason": "BrokerUnreachable", "message": "down",
                          "lastTransitionTime": "2026-01-01T00:05:00Z", "observedGeneration": 1}


def test_long_messages_are_truncated_for_the_apiserver():
    merged = merge(None, [Condition("Ready", False, "InvalidSpec", "x" * 5000)], "t", None)
    assert len(merged[0]["message"]) == 1024 and "observedGeneration" not in merged[0]
