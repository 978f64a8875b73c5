"""The demo's live view: a rich table on a terminal, a plain line every 5 s elsewhere (CI logs)."""
from __future__ import annotations

import math
from typing import Any

from .demo_plan import SurgePlan
from .demo_report import Sample, trailing_rate
from .kubelet import KubeletEvent


class LiveView:
    """Rich live table on a terminal, a plain line every 5 s elsewhere (CI logs)."""

    def __init__(self, plan: SurgePlan, fancy: bool) -> None:
        self.plan, self.fancy = plan, fancy
        self._live: Any = None
        self._history: list[Sample] = []
        self._last_line = -10.0
        self._events: list[str] = []

    def __enter__(self) -> LiveView:
        if self.fancy:
            from rich.live import Live

            self._live = Live(self._render(None, "starting"), refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def say(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text)
        else:
            print(text, flush=True)

    def kubelet_event(self, event: KubeletEvent) -> None:
        if event.kind in ("crash", "kill"):
            self.say(f"kubelet: {event.kind} {event.pod} {event.detail}")

    def sample(self, sample: Sample, phase: str) -> None:
        self._history.append(sample)
        if self._live is not None:
            self._live.update(self._render(sample, phase))
        elif sample.t - self._last_line >= 5 or phase == "done":
            self._last_line = sample.t
            arrival, sent = self._rates()
            print(f"t={sample.t:6.1f}s {phase:9} backlog={_fmt(sample.backlog):>6} arrival={arrival:5.1f}/s "
                  f"sent={sent:5.1f}/s replicas desired={_fmt(sample.desired)} ready={sample.ready} "
                  f"pods={sample.pods} published={sample.published} received={sample.received}", flush=True)

    def _rates(self) -> tuple[float, float]:
        history = self._history[-6:]
        t = [s.t for s in history]
        if len(t) < 2:
            return 0.0, 0.0
        return (trailing_rate([s.published for s in history], t, 5.0)[-1],
                trailing_rate([s.received for s in history], t, 5.0)[-1])

    def _render(self, sample: Sample | None, phase: str) -> Any:
        from rich.table import Table

        table = Table(title=f"[bold]{self.plan.name}[/] — live closed loop", show_header=False, min_width=64)
        table.add_column(style="cyan", no_wrap=True)
        table.add_column()
        if sample is None:
            table.add_row("phase", phase)
            return table
        arrival, sent = self._rates()
        need = math.ceil(arrival / self.plan.rate_per_replica) if arrival else 0
        bar = "█" * min(60, (sample.backlog or 0) // 10)
        table.add_row("elapsed", f"{sample.t:.0f} s of {self.plan.duration_seconds:g} s  ({phase})")
        table.add_row("planned arrival", f"{self.plan.rate_at(sample.t):g} emails/s")
        table.add_row("arrival / sent", f"{arrival:.1f} / {sent:.1f} emails/s  (~{need} workers needed)")
        table.add_row("backlog", f"{_fmt(sample.backlog)} (ready {_fmt(sample.backlog_ready)}, unacked "
                                 f"{_fmt(sample.backlog_unacked)}) {bar}")
        table.add_row("replicas", f"desired {_fmt(sample.desired)} · pods {sample.pods} · ready {sample.ready}  "
                                  f"[min {self.plan.min_replicas}, max {self.plan.max_replicas}]")
        table.add_row("published / received", f"{sample.published} / {sample.received}")
        table.add_row("last decision", sample.reason[:110] or "-")
        return table


def _fmt(value: int | None) -> str:
    return "?" if value is None else str(value)
