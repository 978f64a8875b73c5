"""Status conditions, computed by pure functions (values in, values out).

A condition keeps its lastTransitionTime while its status stays the same, so
`kubectl describe` shows since when something has been wrong.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

TYPES = ("Ready", "MetricsAvailable", "ScalingLimited", "FallbackActive", "DownstreamSaturated", "Paused")


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def merge(previous: Iterable[Mapping[str, Any]] | None, current: Iterable[Condition], now_iso: str,
          generation: int | None) -> list[dict[str, Any]]:
    """Conditions as status wants them, keeping transition times of unchanged ones."""
    before = {c.get("type"): c for c in (previous or []) if isinstance(c, Mapping)}
    merged = []
    for cond in current:
        status = "True" if cond.status else "False"
        old = before.get(cond.type)
        since = old.get("lastTransitionTime") if old and old.get("status") == status else now_iso
        entry: dict[str, Any] = {"type": cond.type, "status": status, "reason": cond.reason,
                                 "message": cond.message[:1024], "lastTransitionTime": since or now_iso}
        if generation is not None:
            entry["observedGeneration"] = generation
        merged.append(entry)
    return merged


def ready(ok: bool, reason: str, message: str) -> Condition:
    return Condition("Ready", ok, reason, message)
