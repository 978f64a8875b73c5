"""Broker probe on RabbitMQ's Prometheus plugin (`rabbitmq_prometheus`, port 15692).

Reads `/metrics/detailed`, the endpoint that still has per-queue numbers when
`management_agent.disable_metrics_collector = true` (RabbitMQ's recommended setup with
this plugin), which leaves the management API without message counts or rates.

What it reads, by family (`?family=` selects them, `?vhost=` filters by vhost):
- gauges, every version: `queue_coarse_metrics` (`rabbitmq_detailed_queue_messages_ready`,
  `..._messages_unacked`) and `queue_consumer_count` (`rabbitmq_detailed_queue_consumers`),
  labels `vhost`, `queue`;
- counters, RabbitMQ 4.x (since 4.0.1): per queue in `queue_delivery_metrics` (labels
  `vhost`, `queue`) and `queue_exchange_metrics` (labels `vhost`, `exchange`, `queue`);
- counters, RabbitMQ 3.10: per channel only, in `channel_queue_metrics` (labels `channel`,
  `vhost`, `queue`) and `channel_queue_exchange_metrics` (labels `channel`, `queue_vhost`,
  `queue`, `exchange_vhost`, `exchange`); a channel's series vanish when it closes, and
  `?vhost=` does not filter these two families (it does filter all the others above).
Names and labels checked against scrapes of 3.10.8 and 4.0.5 (tests/unit/data/prometheus).
A family the plugin knows is declared (`# TYPE`) even when it has no samples; one it does
not know is left out, so asking for both the 4.x and the 3.10 families is harmless.

Counters become rates over the operator's own window, from its own scrapes: per scrape,
each series' increase since the previous scrape is added to a monotonic per-queue
accumulator (a series first seen counts whole, one that went down was reset and counts its
new value, one that vanished adds nothing), and the rate is Δaccumulator/Δt
(`rates.counter_rate`). So channel churn and broker restarts never produce negative or
invented rates, and a queue needs two scrapes a window apart before its rates are known.

A cluster: the plugin reports a queue only on the node of its leader (rabbitmq-server#12021;
on the test bed's 3-node 3.10.8 cluster only the leader's node has a quorum queue's gauges, and
its 3.10 per-channel counters are on the publishing channel's node, which has no gauge of it:
tests/integration/test_prometheus_cluster.py), so one node's URL is blind whenever the leader
is elsewhere and a load-balanced Service flips between nodes. The URL may list the nodes (as
the management URL does, `rabbitmq.http_urls`): `PrometheusClusterProbe` scrapes each in
parallel, with its own backoff, and merges (`cluster_stats`): the queue is read on the node
reporting it (one of two while its leader moves), counters are kept per node
(`ClusterCounterAccumulator`), and a queue missing while a node does not answer is
`ClusterBlind`, not `QueueNotFound`.

One scrape per (endpoint, vhost) serves every EmailQueue polled within `cache_seconds`.
What is not measured is blind, never zero: a queue absent from the scrape is
`QueueNotFound`, a gauge missing for a present queue, a body that is not Prometheus text,
or any HTTP failure is a `BrokerError` whose message names the endpoint as `host:port`
only (no credentials, no URL, no body).
"""
from __future__ import annotations

import math
import re
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests
import requests.adapters
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .rabbitmq import (
    BrokerError,
    QueueNotFound,
    QueueStats,
    TlsAdapter,
    TlsOptions,
    _Backoff,
    aggregate,
    combine_count,
    combine_counts,
    http_get,
    http_urls,
    select_queues,
)
from .rates import counter_rate

PROMETHEUS_DEFAULT_PORT = 15692

READY = "rabbitmq_detailed_queue_messages_ready"
UNACKED = "rabbitmq_detailed_queue_messages_unacked"
CONSUMERS = "rabbitmq_detailed_queue_consumers"
GAUGES = {"ready": READY, "unacked": UNACKED, "consumers": CONSUMERS}


@dataclass(frozen=True)
class CounterSource:
    """Where one kind of counter lives in a scrape: a family, the samples summed, the
    label that carries the queue's vhost (the queue's name is always `queue`)."""

    family: str
    samples: tuple[str, ...]
    vhost_label: str


# RabbitMQ 4.x: per queue. "deliver" matches the management API's deliver_get (consumer
# deliveries and basic.get, with and without acks), as ManagementProbe reports it.
PER_QUEUE_COUNTERS: Mapping[str, CounterSource] = {
    "publish": CounterSource("queue_exchange_metrics",
                             ("rabbitmq_detailed_queue_exchange_messages_published_total",), "vhost"),
    "deliver": CounterSource("queue_delivery_metrics",
                             ("rabbitmq_detailed_queue_messages_delivered_ack_total",
                              "rabbitmq_detailed_queue_messages_delivered_total",
                              "rabbitmq_detailed_queue_get_ack_total",
                              "rabbitmq_detailed_queue_get_total"), "vhost"),
    "ack": CounterSource("queue_delivery_metrics", ("rabbitmq_detailed_queue_messages_acked_total",), "vhost"),
}
# RabbitMQ 3.10 (and still in 4.x): per channel and queue; summed over channels.
PER_CHANNEL_COUNTERS: Mapping[str, CounterSource] = {
    "publish": CounterSource("channel_queue_exchange_metrics",
                             ("rabbitmq_detailed_queue_messages_published_total",), "queue_vhost"),
    "deliver": CounterSource("channel_queue_metrics",
                             ("rabbitmq_detailed_channel_messages_delivered_ack_total",
                              "rabbitmq_detailed_channel_messages_delivered_total",
                              "rabbitmq_detailed_channel_get_ack_total",
                              "rabbitmq_detailed_channel_get_total"), "vhost"),
    "ack": CounterSource("channel_queue_metrics", ("rabbitmq_detailed_channel_messages_acked_total",), "vhost"),
}
COUNTER_KINDS = ("publish", "deliver", "ack")

GAUGE_FAMILIES = ("queue_coarse_metrics", "queue_consumer_count")
PER_QUEUE_FAMILIES = ("queue_delivery_metrics", "queue_exchange_metrics")
PER_CHANNEL_FAMILIES = ("channel_queue_metrics", "channel_queue_exchange_metrics")


class ScrapeUnparseable(BrokerError):
    """The endpoint answered with something that is not Prometheus text."""

    reason = "MetricsUnparseable"


class MetricsMissing(BrokerError):
    """The scrape lacks a metric the probe needs (a gauge of a present queue, a family)."""

    reason = "MetricsMissing"


@dataclass(frozen=True)
class PrometheusEndpoint:
    """Where the Prometheus plugin listens, e.g. http://rabbit:15692 (the probe appends
    /metrics/detailed). Credentials are optional: the plugin needs none unless a proxy or
    its own TLS/auth settings ask for them; they never appear in repr or `display`."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsOptions = TlsOptions()

    def __post_init__(self) -> None:
        for url in http_urls(self.url):
            try:
                parts = urllib.parse.urlsplit(url)
                parts.port  # noqa: B018 - raises ValueError on a malformed port
            except ValueError:
                raise BrokerError("the Prometheus URL is malformed") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise BrokerError("the Prometheus URL must look like http://host:15692")
            if parts.username is not None or parts.password is not None:
                # Credentials in the URL would end up in reprs and logs: they belong in the Secret's keys.
                raise BrokerError("the Prometheus URL must not carry credentials: use usernameKey/passwordKey")

    @property
    def display(self) -> str:
        return ",".join(_host_port(url) for url in http_urls(self.url))

    @property
    def nodes(self) -> tuple[PrometheusEndpoint, ...]:
        """One endpoint per node URL listed (duplicates dropped), with this one's credentials and TLS."""
        urls = tuple(dict.fromkeys(http_urls(self.url)))
        return tuple(PrometheusEndpoint(url, self.username, self.password, self.tls) for url in urls)

    def open_probe(self) -> PrometheusProbe | PrometheusClusterProbe:
        """A new probe of this endpoint (what `rabbitmq.BrokerPool.prometheus` shares): of the one
        URL given, or of every node of a cluster when the URL is a list of them."""
        if len(self.nodes) > 1:
            return PrometheusClusterProbe(self)
        return PrometheusProbe(self)

    @property
    def metrics_url(self) -> str:
        base = self.url.rstrip("/")
        if base.endswith("/metrics/detailed"):
            return base
        if base.endswith("/metrics"):
            return base + "/detailed"
        return base + "/metrics/detailed"


def _host_port(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


# --- pure: exposition text → per-queue values -----------------------------------------

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
"""One counter series of a queue: the sample name and its labels other than vhost/queue."""


@dataclass(frozen=True)
class QueueMetrics:
    """One queue in one scrape. A gauge is None when the scrape lacks it for this queue."""

    ready: float | None
    unacked: float | None
    consumers: float | None
    counters: Mapping[str, Mapping[SeriesKey, float]]
    """kind ("publish", "deliver", "ack") → its series → value; a kind whose family the
    scrape lacks is absent, a kind with no series (no traffic yet) maps to {}."""


@dataclass(frozen=True)
class Scrape:
    queues: Mapping[tuple[str, str], QueueMetrics]
    """(vhost, queue) → metrics, for every queue that has at least one gauge."""
    counter_families: Mapping[str, str]
    """kind → the family its counters came from (per queue on 4.x, per channel on 3.10)."""
    gauges_declared: bool = True
    """Whether the text declares the queue gauges at all: the plugin does even for a vhost
    without queues; a page that merely parses (an empty body) does not."""
    unhosted_counters: Mapping[tuple[str, str], Mapping[str, Mapping[SeriesKey, float]]] = field(
        default_factory=dict)
    """(vhost, queue) → kind → series, for queues this scrape has counters but no gauges of;
    kept only when asked (`parse_scrape(..., unhosted_counters=True)`, a cluster's nodes): on
    3.10 a channel's counters are on the channel's node, the queue's gauges on its leader's."""

    @property
    def per_queue_counters(self) -> bool:
        return all(self.counter_families.get(kind) == PER_QUEUE_COUNTERS[kind].family for kind in COUNTER_KINDS)


def _declared(families: Iterable[Metric]) -> set[str]:
    """Sample names the scrape declares (a `# TYPE` line), with or without samples:
    the plugin declares a family it knows even when nothing in it has a value yet."""
    names: set[str] = set()
    for family in families:
        names.add(family.name)
        if family.type == "counter":  # the parser drops the _total of counter families
            names.add(family.name + "_total")
    return names


def parse_scrape(text: str, unhosted_counters: bool = False) -> Scrape:
    """Parse `/metrics/detailed` text into per-(vhost, queue) gauges and counter series
    (and, with `unhosted_counters`, the counter series of queues without gauges here).

    Raises ValueError (from prometheus_client's parser or here) on anything that is not
    Prometheus text or lacks the labels the plugin always sets.
    """
    families = list(text_string_to_metric_families(text))
    declared = _declared(families)
    samples: dict[str, list[tuple[Mapping[str, str], float]]] = {}
    for family in families:
        for sample in family.samples:
            value = float(sample.value)
            if math.isfinite(value):  # NaN/Inf is not a measurement: treated as absent
                samples.setdefault(sample.name, []).append((sample.labels, value))

    gauges: dict[tuple[str, str], dict[str, float]] = {}
    for key, name in GAUGES.items():
        for labels, value in samples.get(name, ()):
            gauges.setdefault(_queue_of(labels, "vhost", name), {})[key] = value

    sources: dict[str, CounterSource] = {}
    for kind in COUNTER_KINDS:
        for table in (PER_QUEUE_COUNTERS, PER_CHANNEL_COUNTERS):
            if all(name in declared for name in table[kind].samples):
                sources[kind] = table[kind]
                break

    counters: dict[tuple[str, str], dict[str, dict[SeriesKey, float]]] = {q: {k: {} for k in sources} for q in gauges}
    unhosted: dict[tuple[str, str], dict[str, dict[SeriesKey, float]]] = {}
    for kind, source in sources.items():
        for name in source.samples:
            for labels, value in samples.get(name, ()):
                queue = _queue_of(labels, source.vhost_label, name)
                rest = tuple(sorted((k, v) for k, v in labels.items() if k not in (source.vhost_label, "queue")))
                if queue in counters:
                    counters[queue][kind][(name, rest)] = value
                elif unhosted_counters:
                    unhosted.setdefault(queue, {k: {} for k in sources})[kind][(name, rest)] = value
                # else: series of a queue without gauges (being deleted, or hosted elsewhere) are ignored

    return Scrape(
        queues={q: QueueMetrics(ready=g.get("ready"), unacked=g.get("unacked"), consumers=g.get("consumers"),
                                counters=counters[q]) for q, g in gauges.items()},
        counter_families={kind: source.family for kind, source in sources.items()},
        gauges_declared=all(name in declared for name in GAUGES.values()),
        unhosted_counters=unhosted)


def _queue_of(labels: Mapping[str, str], vhost_label: str, name: str) -> tuple[str, str]:
    try:
        return labels[vhost_label], labels["queue"]
    except KeyError:
        raise ValueError(f"{name} lacks the {vhost_label!r} or 'queue' label") from None


# --- pure: counters → rates over the operator's own window ---------------------------

def series_increase(previous: Mapping[SeriesKey, float], current: Mapping[SeriesKey, float]) -> float:
    """How much a queue's counter grew between two scrapes, summed over its series.

    A series new in `current` started after `previous` was taken: all of it is increase.
    A series lower than before was reset: its new value is the increase. A series that
    vanished (its channel closed) adds nothing more.
    """
    total = 0.0
    for key, value in current.items():
        before = previous.get(key)
        if before is None or value < before:
            total += value
        else:
            total += value - before
    return total


@dataclass
class _Track:
    family: str
    last: Mapping[SeriesKey, float]
    history: deque[tuple[float, float]]  # (t, accumulated increase since the track began), ascending t


class CounterAccumulator:
    """Monotonic per-queue counters built from successive scrapes of one scope (an
    endpoint and vhost). No I/O; the caller passes its clock's time with each scrape."""

    def __init__(self, keep_seconds: float = 60.0) -> None:
        self.keep_seconds = keep_seconds
        self._tracks: dict[tuple[str, str, str], _Track] = {}

    def observe(self, t: float, scrape: Scrape) -> None:
        seen: set[tuple[str, str, str]] = set()
        for (vhost, queue), metrics in scrape.queues.items():
            for kind, series in metrics.counters.items():
                key = (vhost, queue, kind)
                seen.add(key)
                family = scrape.counter_families[kind]
                track = self._tracks.get(key)
                if track is None or track.family != family:
                    # A queue seen for the first time (or whose counters now come from another
                    # family, e.g. after an upgrade to 4.x) starts from a baseline, not from its total.
                    self._tracks[key] = _Track(family, dict(series), deque([(t, 0.0)]))
                    continue
                total = track.history[-1][1] + series_increase(track.last, series)
                track.last = dict(series)
                track.history.append((t, total))
                cutoff = t - self.keep_seconds
                while len(track.history) > 2 and track.history[1][0] <= cutoff:
                    track.history.popleft()  # keeps the newest sample at or before the cutoff
        for key in set(self._tracks) - seen:
            del self._tracks[key]  # queue deleted (or counters gone): a new one starts afresh

    def samples(self, vhost: str, queue: str, kind: str) -> list[tuple[float, float]]:
        track = self._tracks.get((vhost, queue, kind))
        return list(track.history) if track else []

    def rate(self, vhost: str, queue: str, kind: str, now: float, window: float) -> float | None:
        return counter_rate(self.samples(vhost, queue, kind), now, window)


@dataclass
class _NodeTrack:
    last: Mapping[str, tuple[str, Mapping[SeriesKey, float]]]  # node → (family, its series) at the last scrape
    history: deque[tuple[float, float]]


class ClusterCounterAccumulator:
    """`CounterAccumulator` for a cluster's nodes scraped together: a queue's counter series are
    kept per node (the node is part of the series key), so a counter is only ever compared with
    the same node's previous value. A node's first report of a queue (its leader moved there, the
    node is back from an outage, a channel on it began publishing on 3.10) is a baseline, not an
    increase: its value may hold history the previous scrapes never saw, and counting it whole
    would be a giant rate. A node's series that vanished (the leader left it, the node did not
    answer) add nothing, so the per-queue total never goes down. The cost is an undercount once,
    of what the new node counted between the move and its first scrape."""

    def __init__(self, keep_seconds: float = 60.0) -> None:
        self.keep_seconds = keep_seconds
        self._tracks: dict[tuple[str, str, str], _NodeTrack] = {}

    def observe(self, t: float, scrapes: Mapping[str, Scrape]) -> None:
        """One round: node → its scrape, for the nodes that answered."""
        current: dict[tuple[str, str, str], dict[str, tuple[str, Mapping[SeriesKey, float]]]] = {}
        for node, scrape in scrapes.items():
            hosted = ((queue, metrics.counters) for queue, metrics in scrape.queues.items())
            for (vhost, queue), per_kind in (*hosted, *scrape.unhosted_counters.items()):
                for kind, series in per_kind.items():
                    current.setdefault((vhost, queue, kind), {})[node] = (scrape.counter_families[kind], dict(series))
        for key, by_node in current.items():
            track = self._tracks.get(key)
            if track is None:
                self._tracks[key] = _NodeTrack(by_node, deque([(t, 0.0)]))
                continue
            increase = 0.0
            for node, (family, series) in by_node.items():
                before = track.last.get(node)
                if before is not None and before[0] == family:
                    increase += series_increase(before[1], series)
            track.last = by_node
            track.history.append((t, track.history[-1][1] + increase))
            cutoff = t - self.keep_seconds
            while len(track.history) > 2 and track.history[1][0] <= cutoff:
                track.history.popleft()
        for key in set(self._tracks) - set(current):
            del self._tracks[key]

    def samples(self, vhost: str, queue: str, kind: str) -> list[tuple[float, float]]:
        track = self._tracks.get((vhost, queue, kind))
        return list(track.history) if track else []

    def rate(self, vhost: str, queue: str, kind: str, now: float, window: float) -> float | None:
        return counter_rate(self.samples(vhost, queue, kind), now, window)


def stats_from_scrape(scrape: Scrape, accumulator: CounterAccumulator | ClusterCounterAccumulator, vhost: str,
                      names: list[str], how: str, now: float, window: float, display: str) -> QueueStats:
    """Aggregate the selected queues of one scrape into one QueueStats (pure)."""
    per_queue = []
    for name in names:
        metrics = scrape.queues[(vhost, name)]
        missing = [GAUGES[k] for k in ("ready", "unacked", "consumers") if getattr(metrics, k) is None]
        if missing:
            raise MetricsMissing(f"the scrape of {display} is missing {', '.join(missing)} for queue {name!r} "
                                 f"in vhost {vhost!r}")
        per_queue.append(metrics)

    def count(value: float | None) -> int:
        return math.ceil(value or 0.0)  # gauges are whole counts carried as floats

    def rate(kind: str) -> float | None:
        rates = [accumulator.rate(vhost, name, kind, now, window) for name in names]
        # One queue of a regex still without a window of history makes the aggregate unknown:
        # a sum over the others would understate it.
        return None if any(r is None for r in rates) else aggregate(rates, how)

    ready, unacked = combine_counts([(count(m.ready), count(m.unacked)) for m in per_queue], how)
    consumers = combine_count((count(m.consumers) for m in per_queue), how)
    return QueueStats(ready=ready, unacked=unacked, consumers=consumers or 0,
                      publish_rate=rate("publish"), ack_rate=rate("ack"), deliver_rate=rate("deliver"),
                      oldest_age_seconds=None, queues=tuple(names), source="prometheus")


# --- pure: a cluster's node scrapes → one view ---------------------------------------

class ClusterBlind(BrokerError):
    """The queue is on no node that answered, and some node did not answer: it may be there
    (a classic queue on the dead node, a quorum queue before its new leader is elected). Blind,
    not `QueueNotFound` (which says the queue does not exist)."""

    reason = "NodesUnreachable"


def _messages(metrics: QueueMetrics) -> tuple[bool, float]:
    complete = None not in (metrics.ready, metrics.unacked, metrics.consumers)
    return complete, (metrics.ready or 0.0) + (metrics.unacked or 0.0)


def merge_gauges(scrapes: Mapping[str, Scrape]) -> dict[tuple[str, str], tuple[str, QueueMetrics]]:
    """(vhost, queue) → (node, its metrics) over a cluster's scrapes (in the nodes' order).

    The plugin reports a queue only on the node of its leader (rabbitmq-server#12021), so a
    queue is normally on one node. Two nodes report it while the leader moves (the scrapes are
    not simultaneous) or while a node still holds a stale row: the one taken has all three gauges
    and the most messages (ready + unacked), the first node in the list on a tie. Never a sum, which
    would count the queue twice; the highest, because an overstated backlog for a poll at worst
    scales up early, which the scale-down window absorbs, while an understated one may scale down.
    """
    merged: dict[tuple[str, str], tuple[str, QueueMetrics]] = {}
    for node, scrape in scrapes.items():
        for key, metrics in scrape.queues.items():
            taken = merged.get(key)
            if taken is None or _messages(metrics) > _messages(taken[1]):
                merged[key] = (node, metrics)
    return merged


def cluster_stats(scrapes: Mapping[str, Scrape], failures: Mapping[str, BrokerError],
                  accumulator: ClusterCounterAccumulator, vhost: str, queue: str | None, queue_regex: str | None,
                  how: str, now: float, window: float) -> QueueStats:
    """QueueStats from one round of a cluster's scrapes (pure): `scrapes` of the nodes that
    answered, `failures` of those that did not (node → its error), in the nodes' order.

    A queue found on a node that answered is read there, whatever the others did (when a node
    dies, a quorum queue's new leader on a survivor reports it). Not found: `QueueNotFound` when
    every node answered, else `ClusterBlind` naming the silent nodes; no node answered: their
    errors (one class when they agree, e.g. `BrokerAuthError`). A queueRegex aggregates distinct
    queues, each read from one node; while a node is silent it aggregates what the others report
    (a quorum queue led there reappears on a survivor within an election; a classic queue hosted
    only there is unavailable anyway, and left out).
    """
    display = ",".join((*scrapes, *failures))
    if not scrapes:
        kinds = {type(exc) for exc in failures.values()}
        cls = kinds.pop() if len(kinds) == 1 else BrokerError
        raise cls("no node of the cluster answered: " + "; ".join(str(exc) for exc in failures.values()))
    merged = merge_gauges(scrapes)
    try:
        names = select_queues([q for v, q in merged if v == vhost], queue, queue_regex)
    except re.error:
        raise BrokerError(f"queueRegex {queue_regex!r} is not a valid regular expression") from None
    if not names:
        what = f"no queue matches {queue_regex!r}" if queue_regex is not None else f"queue {queue!r} not found"
        if failures:
            raise ClusterBlind(f"{what} in vhost {vhost!r} on the nodes that answered ({', '.join(scrapes)}); "
                               f"not answering: {', '.join(failures)} (it may be there; blind until they answer "
                               "or a survivor reports it)")
        raise QueueNotFound(f"{what} in vhost {vhost!r} on {display}")
    chosen = Scrape(queues={key: metrics for key, (_, metrics) in merged.items()}, counter_families={})
    return stats_from_scrape(chosen, accumulator, vhost, names, how, now, window, display)


# --- I/O: the shared probe of one endpoint -------------------------------------------

@dataclass
class _Scope:
    """One vhost of one endpoint: its fetch lock, last scrape and counter history."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    scraped_at: float | None = None
    scrape: Scrape | None = None
    accumulator: CounterAccumulator = field(default_factory=CounterAccumulator)


class PrometheusProbe:
    """A shared HTTP session for one Prometheus plugin endpoint.

    Each vhost is scraped at most once per `cache_seconds`, filtered by `?vhost=` and
    `?family=`, whatever the number of EmailQueues polling it; other callers wait for the
    scrape in flight. One scrape per vhost (not one for the whole broker) because the
    filter makes the broker's work and the response scale with that vhost's queues (on
    4.x every family used is filtered; on 3.10 the per-channel families ignore the filter
    and come whole with each vhost's scrape, the probe keeps only that vhost's series).
    """

    def __init__(self, endpoint: PrometheusEndpoint, timeout: float = 5.0, cache_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._session = requests.Session()
        if endpoint.username is not None:
            self._session.auth = (endpoint.username, endpoint.password or "")
        if endpoint.tls.enabled:
            self._session.mount("https://", TlsAdapter(endpoint.tls))
        # Passed with each request: a Session-level verify=False loses to REQUESTS_CA_BUNDLE.
        self._verify = not (endpoint.tls.enabled and endpoint.tls.insecure_skip_verify)
        self._lock = threading.Lock()
        self._scopes: dict[str, _Scope] = {}
        self._backoff = _Backoff(clock=clock)
        self._per_queue_counters = False  # learned from the scrapes: 4.x needs no per-channel families
        self._longest_window = 0.0
        self.requests = 0  # scrapes sent (for tests and benchmarks)

    def families(self) -> tuple[str, ...]:
        """Families to ask for. Unknown ones are ignored by the plugin, so until a scrape
        shows per-queue counters (4.x) the per-channel ones (3.10) are asked for too."""
        if self._per_queue_counters:
            return GAUGE_FAMILIES + PER_QUEUE_FAMILIES
        return GAUGE_FAMILIES + PER_QUEUE_FAMILIES + PER_CHANNEL_FAMILIES

    def _scope(self, vhost: str) -> _Scope:
        with self._lock:
            return self._scopes.setdefault(vhost, _Scope())

    def _fetch(self, vhost: str) -> str:
        display = self.endpoint.display

        def not_found() -> BrokerError:
            self._backoff.failed("HTTP 404")
            return BrokerError(f"Prometheus endpoint {display}: HTTP 404 (is it the rabbitmq_prometheus listener, "
                               "port 15692?)")

        self._backoff.check(display)
        self.requests += 1
        resp = http_get(self._session.get, self._backoff, f"Prometheus endpoint {display}", self.endpoint.metrics_url,
                        not_found=not_found, timeout=self.timeout, verify=self._verify,
                        params={"vhost": vhost, "family": list(self.families())})
        try:
            return resp.text
        except Exception as exc:  # undecodable body: not what the plugin sends
            self._backoff.failed(type(exc).__name__)
            raise ScrapeUnparseable(f"Prometheus endpoint {display} sent an unreadable body "
                                    f"({type(exc).__name__})") from None

    def _scrape(self, vhost: str, scope: _Scope) -> Scrape:
        """The vhost's current scrape; called with scope.lock held."""
        if scope.scrape is not None and scope.scraped_at is not None and \
                self.clock() - scope.scraped_at < self.cache_seconds:
            return scope.scrape
        scrape = self.read(vhost)
        now = self.clock()
        scope.accumulator.keep_seconds = max(60.0, 2 * self._longest_window)
        scope.accumulator.observe(now, scrape)
        scope.scrape, scope.scraped_at = scrape, now
        return scrape

    def read(self, vhost: str, unhosted_counters: bool = False) -> Scrape:
        """One scrape of the vhost, parsed and checked (no cache, no counters); BrokerError when
        the endpoint is backing off, unreachable, or sends no usable metrics."""
        text = self._fetch(vhost)
        display = self.endpoint.display
        try:
            scrape = parse_scrape(text, unhosted_counters)
        except Exception as exc:  # any parser failure means no trustworthy number (never a 0)
            self._backoff.failed("unparseable metrics")
            raise ScrapeUnparseable(f"Prometheus endpoint {display} did not answer with Prometheus text "
                                    f"({type(exc).__name__}); is the URL the rabbitmq_prometheus listener?") from None
        if not scrape.gauges_declared:
            self._backoff.failed("no queue metrics")
            raise MetricsMissing(f"Prometheus endpoint {display} is missing the queue gauges "
                                 f"({', '.join(GAUGES.values())}): is it RabbitMQ's rabbitmq_prometheus plugin?")
        self._backoff.succeeded()
        self._per_queue_counters = scrape.per_queue_counters
        return scrape

    def queue_stats(self, vhost: str, queue: str | None = None, queue_regex: str | None = None, how: str = "sum",
                    window_seconds: float = 10.0) -> QueueStats:
        """Gauges of the queue (or of the queues `queue_regex` matches, aggregated by `how`)
        and publish/ack/deliver rates over `window_seconds` (None until the probe has two
        scrapes of the queue far enough apart). Callers pass `rates.counter_rate_window(poll)`."""
        self._longest_window = max(self._longest_window, window_seconds)
        scope = self._scope(vhost)
        with scope.lock:  # one scrape in flight per vhost; the others wait for its answer
            scrape = self._scrape(vhost, scope)
            display = self.endpoint.display
            try:
                names = select_queues([q for v, q in scrape.queues if v == vhost], queue, queue_regex)
            except re.error:
                raise BrokerError(f"queueRegex {queue_regex!r} is not a valid regular expression") from None
            if not names:
                if queue_regex is not None:
                    raise QueueNotFound(f"no queue matches {queue_regex!r} in vhost {vhost!r} on {display}")
                raise QueueNotFound(f"queue {queue!r} not found in vhost {vhost!r} on {display}")
            return stats_from_scrape(scrape, scope.accumulator, vhost, names, how, self.clock(), window_seconds,
                                     display)

    def close(self) -> None:
        self._session.close()



# --- I/O: the shared probe of a cluster's nodes --------------------------------------

@dataclass
class _ClusterScope:
    """One vhost of a cluster: its fetch lock, last round of scrapes and counter history."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    scraped_at: float | None = None
    scrapes: Mapping[str, Scrape] = field(default_factory=dict)
    failures: Mapping[str, BrokerError] = field(default_factory=dict)
    accumulator: ClusterCounterAccumulator = field(default_factory=ClusterCounterAccumulator)


class PrometheusClusterProbe:
    """The Prometheus plugin of every node of a cluster, for a URL that lists them.

    `/metrics/detailed` on a node reports only the queues whose leader is on that node, so one
    node's URL sees a queue only while its leader is there, and a load-balanced Service flips
    between nodes. This probe scrapes every node in parallel (one `PrometheusProbe` each: its own
    session, backoff and `timeout`, so a dead node costs the round at most one timeout and is then
    skipped while it backs off) and merges the answers with `cluster_stats`. One round per vhost
    serves every caller within `cache_seconds`, as with one node.
    """

    def __init__(self, endpoint: PrometheusEndpoint, timeout: float = 5.0, cache_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoint = endpoint
        self.cache_seconds = cache_seconds
        self.clock = clock
        self.nodes = tuple(PrometheusProbe(node, timeout=timeout, cache_seconds=cache_seconds, clock=clock)
                           for node in endpoint.nodes)
        self._pool = ThreadPoolExecutor(max_workers=len(self.nodes), thread_name_prefix="prometheus-node")
        self._lock = threading.Lock()
        self._scopes: dict[str, _ClusterScope] = {}
        self._longest_window = 0.0

    @property
    def requests(self) -> int:
        return sum(node.requests for node in self.nodes)

    def _scope(self, vhost: str) -> _ClusterScope:
        with self._lock:
            return self._scopes.setdefault(vhost, _ClusterScope())

    def _read(self, node: PrometheusProbe, vhost: str) -> Scrape | BrokerError:
        try:
            return node.read(vhost, unhosted_counters=True)
        except BrokerError as exc:
            return exc

    def _round(self, vhost: str, scope: _ClusterScope) -> None:
        """Scrape every node unless the last round is fresh; called with scope.lock held."""
        if scope.scraped_at is not None and self.clock() - scope.scraped_at < self.cache_seconds:
            return
        answers = list(self._pool.map(lambda node: self._read(node, vhost), self.nodes))
        scrapes: dict[str, Scrape] = {}
        failures: dict[str, BrokerError] = {}
        for node, answer in zip(self.nodes, answers, strict=True):
            if isinstance(answer, Scrape):
                scrapes[node.endpoint.display] = answer
            else:
                failures[node.endpoint.display] = answer
        now = self.clock()
        scope.accumulator.keep_seconds = max(60.0, 2 * self._longest_window)
        if scrapes:
            scope.accumulator.observe(now, scrapes)
        scope.scrapes, scope.failures, scope.scraped_at = scrapes, failures, now

    def queue_stats(self, vhost: str, queue: str | None = None, queue_regex: str | None = None, how: str = "sum",
                    window_seconds: float = 10.0) -> QueueStats:
        """As `PrometheusProbe.queue_stats`, over the cluster's nodes (see `cluster_stats`)."""
        self._longest_window = max(self._longest_window, window_seconds)
        scope = self._scope(vhost)
        with scope.lock:
            self._round(vhost, scope)
            return cluster_stats(scope.scrapes, scope.failures, scope.accumulator, vhost, queue, queue_regex, how,
                                 self.clock(), window_seconds)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for node in self.nodes:
            node.close()
