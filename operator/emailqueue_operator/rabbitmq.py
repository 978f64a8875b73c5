"""Broker probes: queue depth, consumers and rates from RabbitMQ.

Owns every connection the operator makes to a broker. One AMQP connection per
(broker, vhost, user) and one HTTP session per management endpoint are shared by all
EmailQueues that name them (KEDA opened one per ScaledObject), and a broker that
fails is not retried more often than its backoff allows, so hundreds of resources
pointing at a dead broker cost neither connections nor a busy loop.

Credentials never appear in errors, logs or reprs: `BrokerError` messages name the
broker as `host:port/vhost` only.
"""
from __future__ import annotations

import functools
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar, cast

import pika
import pika.exceptions
import requests
import requests.adapters

from email_worker.backoff import Backoff
from email_worker.brokers import split_urls, url_list

AMQP_DEFAULT_PORT = 5672
AMQPS_DEFAULT_PORT = 5671


class BrokerError(Exception):
    """A probe failed; the message is safe to show (no credentials)."""

    reason = "BrokerUnreachable"


class QueueNotFound(BrokerError):
    reason = "QueueNotFound"


class BrokerAuthError(BrokerError):
    reason = "BrokerAuthFailed"


@dataclass(frozen=True)
class TlsOptions:
    enabled: bool = False
    ca_pem: str | None = None
    server_name: str | None = None
    insecure_skip_verify: bool = False

    def context(self) -> ssl.SSLContext | None:
        if not self.enabled:
            return None
        ctx = ssl.create_default_context(cadata=self.ca_pem) if self.ca_pem else ssl.create_default_context()
        if self.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


@dataclass(frozen=True)
class AmqpEndpoint:
    """Where and as whom to connect over AMQP. The password is kept out of repr."""

    host: str
    port: int
    vhost: str
    username: str
    password: str = field(repr=False)
    tls: TlsOptions = TlsOptions()
    others: tuple[tuple[str, int], ...] = ()
    """A cluster's further nodes (host, port): same user, password and vhost; tried in turn."""

    @property
    def nodes(self) -> tuple[tuple[str, int], ...]:
        return ((self.host, self.port), *self.others)

    @property
    def display(self) -> str:
        return ",".join(f"{host}:{port}" for host, port in self.nodes) + f"/{self.vhost}"

    @classmethod
    def from_uri(cls, uri: str, tls: TlsOptions | None = None) -> AmqpEndpoint:
        """Parse amqp[s]://user:pass@host:port/vhost (user and password percent-encoded), or a
        cluster's nodes as a list of such URIs (the first one's user, password and vhost)."""
        try:
            uris = split_urls(uri)
        except ValueError:
            raise BrokerError("the AMQP URI must look like amqp://user:password@host:5672/vhost") from None
        first = cls._from_one(uris[0], tls)
        return replace(first, others=tuple(cls._from_one(more, tls).nodes[0] for more in uris[1:]))

    @classmethod
    def _from_one(cls, uri: str, tls: TlsOptions | None) -> AmqpEndpoint:
        try:
            parts = urllib.parse.urlsplit(uri.strip())
            port = parts.port
        except ValueError as exc:
            raise BrokerError(f"the AMQP URI is malformed ({type(exc).__name__})") from None
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise BrokerError("the AMQP URI must look like amqp://user:password@host:5672/vhost")
        secure = parts.scheme == "amqps"
        tls = tls or TlsOptions()
        if secure and not tls.enabled:
            tls = TlsOptions(True, tls.ca_pem, tls.server_name, tls.insecure_skip_verify)
        vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        return cls(host=parts.hostname, port=port or (AMQPS_DEFAULT_PORT if secure else AMQP_DEFAULT_PORT),
                   vhost=vhost, username=urllib.parse.unquote(parts.username or "guest"),
                   password=urllib.parse.unquote(parts.password or "guest"), tls=tls)


def http_urls(text: str) -> tuple[str, ...]:
    """The base URLs in `text`: one, or a cluster's nodes separated by commas or whitespace."""
    return tuple(url.rstrip("/") for url in url_list(text)) or ("",)


@dataclass(frozen=True)
class ManagementEndpoint:
    url: str
    """The management API's base URL, or a cluster's nodes as a list (the probe asks the next
    node when one does not answer: every node serves the whole cluster's queues)."""
    username: str
    password: str = field(repr=False)
    tls: TlsOptions = TlsOptions()

    @property
    def display(self) -> str:
        shown = []
        for url in http_urls(self.url):
            parts = urllib.parse.urlsplit(url)
            shown.append(f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}")
        return ",".join(shown)


@dataclass(frozen=True)
class QueueStats:
    """One probe's view of a queue (or of the queues a regex matched, aggregated).

    Several queues are composed as KEDA composes them (:func:`combine_counts`): ready + unacked
    is the composed total and ready the composed ready count, so with ``max`` and ``avg``
    ``unacked`` is the difference of the two, not an unacked count of its own.
    """

    ready: int
    unacked: int | None
    consumers: int | None
    publish_rate: float | None
    ack_rate: float | None
    deliver_rate: float | None
    oldest_age_seconds: float | None
    queues: tuple[str, ...]
    source: str  # "amqp" | "management" | "management-totals" (no collector) | "prometheus"


# --- pure helpers -----------------------------------------------------------------

AGGREGATES = ("sum", "max", "avg")


@functools.lru_cache(maxsize=256)
def _queue_pattern(queue_regex: str) -> re.Pattern[str]:
    return re.compile(queue_regex, re.IGNORECASE)


def select_queues(names: Iterable[str], queue: str | None = None, queue_regex: str | None = None) -> list[str]:
    """The queue names an EmailQueue watches, sorted: every name `queue_regex` finds a match
    in, else `queue` exactly (case-sensitive, as queue names are).

    The regex is matched as RabbitMQ's management API matches `?use_regex=true&name=` (and so
    KEDA's `useRegex`): an unanchored, case-insensitive search (`re:run(Name, Regex,
    [caseless])`), so `emails` selects `emails-eu` and `bulk-EMAILS`; anchor it (`^emails$`) to
    match whole names. Shared by every probe that lists queues (management API, Prometheus
    plugin), so a regex selects the same queues whichever source reads them. Raises re.error
    for a regex that does not compile (parse_spec rejects those first).
    """
    if queue_regex is not None:
        pattern = _queue_pattern(queue_regex)
        return sorted(name for name in names if pattern.search(name))
    return [queue] if queue is not None and queue in names else []


def aggregate(values: Iterable[float | None], how: str) -> float | None:
    """sum / max / avg of the known values (None when none is known). For rates; counts of
    several queues go through :func:`combine_counts`."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    if how == "sum":
        return float(sum(known))
    if how == "max":
        return float(max(known))
    if how == "avg":
        return float(sum(known)) / len(known)
    raise ValueError(f"unknown aggregate {how!r}")


def combine_counts(per_queue: Sequence[tuple[int, int]], how: str) -> tuple[int, int]:
    """(ready, unacked) of several queues as one queue, the way KEDA composes them.

    KEDA aggregates each queue's total (`messages` = ready + unacked) and its ready count
    (`messages_ready`, with `excludeUnacknowledged`) separately; the backlog the policy sees is
    ready + unacked (or ready alone when `countUnacked` is false), so the pair returned is
    (composed ready, composed total − composed ready):

    - sum: the sums;
    - max: the largest total of any single queue (never more than one queue holds), and the
      largest ready count;
    - avg: the averages truncated to whole messages (Go's integer division in KEDA).
    """
    if how not in AGGREGATES:
        raise ValueError(f"unknown aggregate {how!r}")
    if not per_queue:
        return 0, 0
    readies = [max(0, ready) for ready, _ in per_queue]
    totals = [max(0, ready) + max(0, unacked) for ready, unacked in per_queue]
    if how == "sum":
        ready, total = sum(readies), sum(totals)
    elif how == "max":
        ready, total = max(readies), max(totals)
    else:
        ready, total = sum(readies) // len(per_queue), sum(totals) // len(per_queue)
    return ready, total - ready


def combine_count(values: Iterable[int | None], how: str) -> int | None:
    """One count (e.g. consumers) of several queues: sum, max, or avg truncated; unknown
    values are left out, None when none is known."""
    known = [max(0, v) for v in values if v is not None]
    if not known:
        return None
    if how == "sum":
        return sum(known)
    if how == "max":
        return max(known)
    if how == "avg":
        return sum(known) // len(known)
    raise ValueError(f"unknown aggregate {how!r}")


def _rate(queue: Mapping[str, Any], key: str) -> float | None:
    details = (queue.get("message_stats") or {}).get(f"{key}_details")
    return float(details["rate"]) if details and "rate" in details else None


class MetricsUnavailable(BrokerError):
    """The broker answered, but not with numbers the operator can trust (blind, never zero)."""

    reason = "MetricsUnavailable"


# Queue states whose counts are live. Anything else (down, crashed, stopped, minority,
# terminated, a state a newer broker invents) is not a measurement.
# ("live" is what a broker without its metrics collector reports for every queue.)
LIVE_QUEUE_STATES = frozenset({"running", "flow", "idle", "live"})


def stats_from_management(queues: Sequence[Mapping[str, Any]], how: str, now: float,
                          with_rates: bool = True) -> QueueStats:
    """Aggregate management-API queue objects into one QueueStats (pure).

    ``with_rates`` False: the objects are queue totals of a broker without its metrics
    collector: counts only; consumers, rates and head age are unknown (None), not 0.

    Raises MetricsUnavailable when a queue lacks its counts (the broker's metrics
    collector is disabled: ``management_agent.disable_metrics_collector = true``) or is
    not running: an absent count is unknown, not zero.
    """
    for queue in queues:
        name = queue.get("name")
        state = queue.get("state")
        if state is not None and state not in LIVE_QUEUE_STATES:
            raise MetricsUnavailable(f"queue {name!r} is {state}, its counts are not live")
        missing = [key for key in ("messages_ready", "messages_unacknowledged") if not _is_count(queue.get(key))]
        if missing:
            raise MetricsUnavailable(
                f"the management API gives no {'/'.join(missing)} for queue {name!r} (a new queue's counts come "
                "with the broker's next statistics tick; a broker without them: use broker.prometheusSecretRef)")

    ages = []
    for queue in queues:
        stamp = queue.get("head_message_timestamp")
        ages.append(max(0.0, now - float(stamp)) if isinstance(stamp, (int, float)) else None)

    # A queue object without message_stats had no traffic since it was declared: rates 0.
    def rate(key: str) -> float | None:
        if not with_rates:
            return None
        values = [_rate(q, key) for q in queues]
        if all(v is None for v in values):
            return 0.0 if queues else None
        return aggregate(values, how)

    ready, unacked = combine_counts([(q["messages_ready"], q["messages_unacknowledged"]) for q in queues], how)
    return QueueStats(
        ready=ready,
        unacked=unacked if queues else None,
        consumers=combine_count((q.get("consumers") if with_rates and _is_count(q.get("consumers")) else None
                                 for q in queues), how),
        publish_rate=rate("publish"), ack_rate=rate("ack"), deliver_rate=rate("deliver_get"),
        oldest_age_seconds=aggregate(ages, "max") if with_rates else None,
        queues=tuple(sorted(str(q.get("name")) for q in queues)),
        source="management" if with_rates else "management-totals")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class TlsAdapter(requests.adapters.HTTPAdapter):
    """HTTPS per TlsOptions: the CA given as PEM (not a file), an SNI/verification name."""

    def __init__(self, tls: TlsOptions) -> None:
        self._tls = tls
        super().__init__()

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        pool_kwargs["ssl_context"] = self._tls.context()
        if self._tls.server_name:
            pool_kwargs["server_hostname"] = self._tls.server_name
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

    def cert_verify(self, conn: Any, url: str, verify: bool | str, cert: str | tuple[str, str] | None) -> None:
        # types-requests leaves HTTPAdapter.cert_verify unannotated.
        super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]
        if self._tls.ca_pem and not self._tls.insecure_skip_verify:
            # Trust exactly the CA given, not also the bundle requests would load into the context.
            conn.ca_certs = conn.ca_cert_dir = None



def http_get(get: Callable[..., requests.Response], backoff: _Backoff, what: str, url: str, *,
             not_found: Callable[[], BrokerError] | None = None, **kwargs: Any) -> requests.Response:
    """GET for a probe of an HTTP endpoint (`what` names it in errors, never with credentials).

    Transport errors, 401/403 and other HTTP errors become BrokerError subclasses and count
    in the endpoint's backoff; a 404 raises ``not_found()`` when given (it does not back
    off: a missing vhost is an answer, not an outage). The caller checks the backoff first
    and marks success. `get` is a session's get (or one that tries a cluster's nodes)."""
    try:
        resp = get(url, **kwargs)
    except requests.RequestException as exc:
        backoff.failed(type(exc).__name__)
        raise BrokerError(f"{what} unreachable ({type(exc).__name__})") from None
    if resp.status_code in (401, 403):
        backoff.failed(f"HTTP {resp.status_code}")
        raise BrokerAuthError(f"{what}: HTTP {resp.status_code} for the configured user")
    if resp.status_code == 404 and not_found is not None:
        raise not_found()
    if resp.status_code >= 400:
        backoff.failed(f"HTTP {resp.status_code}")
        raise BrokerError(f"{what}: HTTP {resp.status_code}")
    return resp


# --- AMQP -------------------------------------------------------------------------

class _Backoff(Backoff):
    """Exponential backoff between connection attempts to one broker (no busy loop): an
    attempt inside the wait is refused with a `BrokerError` naming the broker and the last
    error, never the credentials."""

    def __init__(self, base: float = 1.0, cap: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(base=base, cap=cap, clock=clock)

    def check(self, display: str) -> None:
        wait = self.remaining()
        if wait > 0:
            raise BrokerError(f"broker {display} unreachable ({self.last_error}); next attempt in {wait:.0f}s")


class AmqpProbe:
    """A shared AMQP connection for one endpoint; probes queues by passive declare.

    pika's BlockingConnection is not thread-safe, so calls are serialised by a lock:
    a passive declare is a sub-millisecond round trip on a healthy broker.
    """

    def __init__(self, endpoint: AmqpEndpoint, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._lock = threading.Lock()
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any | None = None  # a pika BlockingChannel (pika ships no types)
        self._backoff = _Backoff()
        self.connects = 0  # how many connections were opened (for tests and benchmarks)
        self._failed_connects = 0

    def _parameters(self) -> list[pika.ConnectionParameters]:
        """One set per node, beginning after the node of the last failed attempt (pika tries them in turn)."""
        ep = self.endpoint
        ctx = ep.tls.context()
        nodes = ep.nodes
        start = self._failed_connects % len(nodes)
        return [pika.ConnectionParameters(
            host=host, port=port, virtual_host=ep.vhost,
            credentials=pika.PlainCredentials(ep.username, ep.password),
            ssl_options=None if ctx is None else pika.SSLOptions(ctx, ep.tls.server_name or host),
            heartbeat=30, blocked_connection_timeout=self.timeout,
            socket_timeout=self.timeout, stack_timeout=self.timeout * 2, connection_attempts=1,
            client_properties={"connection_name": "emailqueue-operator"})
            for host, port in (*nodes[start:], *nodes[:start])]

    def _connect(self) -> Any:
        """A new connection (and channel), or BrokerError; returns the connection."""
        self._backoff.check(self.endpoint.display)
        try:
            connection = self._connection = pika.BlockingConnection(self._parameters())
            self._channel = connection.channel()
            self.connects += 1
        except pika.exceptions.ProbableAuthenticationError:
            self._backoff.failed("authentication failed")
            raise BrokerAuthError(
                f"broker {self.endpoint.display}: authentication failed for the configured user") from None
        except pika.exceptions.ProbableAccessDeniedError:
            self._backoff.failed("access denied")
            raise BrokerAuthError(f"broker {self.endpoint.display}: access to the vhost denied") from None
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._backoff.failed(type(exc).__name__)
            self._failed_connects += 1
            raise BrokerError(f"broker {self.endpoint.display} unreachable ({type(exc).__name__})") from None
        self._backoff.succeeded()
        return connection

    def _reset(self) -> None:
        try:
            if self._connection is not None and self._connection.is_open:
                self._connection.close()
        except Exception:  # closing a broken connection may fail in many ways; it is gone either way
            pass
        self._connection = self._channel = None

    def queue_depth(self, queue: str) -> QueueStats:
        with self._lock:
            for attempt in (1, 2):  # a stale connection gets one fresh retry
                connection = self._connection
                if connection is None or not connection.is_open:
                    self._reset()
                    connection = self._connect()
                try:
                    channel = self._channel
                    if channel is None or not channel.is_open:
                        channel = self._channel = connection.channel()
                    ok = channel.queue_declare(queue, passive=True)
                    return QueueStats(ready=ok.method.message_count, unacked=None,
                                      consumers=ok.method.consumer_count, publish_rate=None, ack_rate=None,
                                      deliver_rate=None, oldest_age_seconds=None, queues=(queue,), source="amqp")
                except pika.exceptions.ChannelClosedByBroker as exc:
                    self._channel = None
                    if exc.reply_code == 404:
                        raise QueueNotFound(f"queue {queue!r} not found on {self.endpoint.display}") from None
                    raise BrokerError(f"broker {self.endpoint.display} refused the probe ({exc.reply_code})") from None
                except (pika.exceptions.AMQPError, OSError) as exc:
                    self._reset()
                    if attempt == 2:
                        self._backoff.failed(type(exc).__name__)
                        raise BrokerError(
                            f"broker {self.endpoint.display} connection lost ({type(exc).__name__})") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._reset()

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.is_open


# --- Management HTTP API ----------------------------------------------------------

class ManagementProbe:
    """A shared HTTP session for one management endpoint.

    Listing a vhost's queues is cached for `cache_seconds` so a thousand EmailQueues
    on one vhost cost one request per interval, not one each.
    """

    COLUMNS = "name,state,messages_ready,messages_unacknowledged,consumers,message_stats,head_message_timestamp"
    COLLECTOR_RECHECK_SECONDS = 60.0

    def __init__(self, endpoint: ManagementEndpoint, timeout: float = 5.0, cache_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.clock, self.wall = clock, wall
        self._session = requests.Session()
        self._session.auth = (endpoint.username, endpoint.password)
        if endpoint.tls.enabled:
            self._session.mount("https://", TlsAdapter(endpoint.tls))
        # Passed with each request: a Session-level verify=False loses to REQUESTS_CA_BUNDLE.
        self._verify = not (endpoint.tls.enabled and endpoint.tls.insecure_skip_verify)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, list[dict[str, Any]], bool]] = {}
        self._collector: tuple[float, bool] | None = None
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._backoff = _Backoff(clock=clock)
        self.requests = 0
        self._nodes = http_urls(endpoint.url)
        self._node = 0   # the node that answered last is asked first

    def _get(self, path: str, **kwargs: Any) -> requests.Response:
        """GET `path` from the first node that answers (any HTTP status is an answer), beginning
        with the one that answered last; the last transport error when none does."""
        failure: requests.RequestException | None = None
        for step in range(len(self._nodes)):
            node = (self._node + step) % len(self._nodes)
            try:
                resp = self._session.get(self._nodes[node] + path, **kwargs)
            except requests.RequestException as exc:
                failure = exc
                continue
            self._node = node
            return resp
        assert failure is not None
        raise failure

    def _get_queues(self, vhost: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """One GET of a vhost's queue list; every failure is a BrokerError (blind)."""
        path = f"/api/queues/{urllib.parse.quote(vhost, safe='')}"
        self._backoff.check(self.endpoint.display)
        self.requests += 1
        resp = http_get(self._get, self._backoff, f"management API {self.endpoint.display}", path,
                        not_found=lambda: QueueNotFound(f"vhost {vhost!r} not found on {self.endpoint.display}"),
                        params=dict(params), timeout=self.timeout, verify=self._verify)
        try:
            queues = resp.json()
        except ValueError:
            self._backoff.failed("not JSON")
            raise BrokerError(f"management API {self.endpoint.display} answered HTTP {resp.status_code} "
                              f"with a body that is not JSON ({resp.headers.get('content-type', 'no content type')})"
                              ) from None
        if not isinstance(queues, list) or not all(isinstance(q, dict) for q in queues):
            self._backoff.failed("unexpected JSON")
            raise BrokerError(f"management API {self.endpoint.display}: /api/queues did not return a list of queues")
        self._backoff.succeeded()
        return queues

    def _collector_enabled(self) -> bool:
        """Whether the broker runs its metrics collector (``/api/overview`` says
        ``disable_stats`` when ``management_agent.disable_metrics_collector = true``);
        asked again every ``COLLECTOR_RECHECK_SECONDS``."""
        if self._collector is not None and self.clock() - self._collector[0] < self.COLLECTOR_RECHECK_SECONDS:
            return self._collector[1]
        self._backoff.check(self.endpoint.display)
        try:
            self.requests += 1
            resp = self._get("/api/overview", params={"columns": "disable_stats,rabbitmq_version"},
                             timeout=self.timeout, verify=self._verify)
            overview = resp.json() if resp.status_code == 200 else {}
        except (requests.RequestException, ValueError):
            overview = {}  # the queue listing that follows reports the failure
        enabled = not (isinstance(overview, dict) and overview.get("disable_stats") is True)
        self._collector = (self.clock(), enabled)
        return enabled

    def _list_queues(self, vhost: str) -> tuple[list[dict[str, Any]], bool]:
        """The vhost's queues and whether they carry rates (False: queue totals only).

        A broker with ``management_agent.disable_metrics_collector = true`` lists queues
        without counts; its queue totals (``enable_queue_totals``) still give ready and
        unacked, without consumers or rates.
        """
        with self._lock:
            fetch_lock = self._fetch_locks.setdefault(vhost, threading.Lock())
        with fetch_lock:  # one request in flight per vhost; the others wait for its answer
            cached = self._cache.get(vhost)
            if cached and self.clock() - cached[0] < self.cache_seconds:
                return cached[1], cached[2]
            with_rates = self._collector_enabled()
            params = ({"columns": self.COLUMNS, "disable_stats": "false"} if with_rates
                      else {"disable_stats": "true", "enable_queue_totals": "true"})
            queues = self._get_queues(vhost, params)
            self._cache[vhost] = (self.clock(), queues, with_rates)
            return queues, with_rates

    def queue_stats(self, vhost: str, queue: str | None = None, queue_regex: str | None = None,
                    how: str = "sum") -> QueueStats:
        queues, with_rates = self._list_queues(vhost)
        try:
            selected = set(select_queues([str(q.get("name", "")) for q in queues], queue, queue_regex))
        except re.error:
            raise BrokerError(f"queueRegex {queue_regex!r} is not a valid regular expression") from None
        matched = [q for q in queues if str(q.get("name", "")) in selected]
        if not matched:
            # Blind, not an empty backlog: a typo or the wrong vhost looks exactly like this.
            if queue_regex is not None:
                raise QueueNotFound(f"no queue matches {queue_regex!r} in vhost {vhost!r} on {self.endpoint.display}")
            raise QueueNotFound(f"queue {queue!r} not found in vhost {vhost!r} on {self.endpoint.display}")
        return stats_from_management(matched, how, self.wall(), with_rates=with_rates)

    def close(self) -> None:
        self._session.close()


# --- the pool: one probe per endpoint ------------------------------------------------

_Probe = TypeVar("_Probe", covariant=True)
_Endpoint = TypeVar("_Endpoint")
_Made = TypeVar("_Made")


class OpensProbe(Protocol[_Probe]):
    """An endpoint that opens its own probe. The Prometheus plugin's endpoint and probe live in
    rabbitmq_prometheus, which builds on this module: the pool asks the endpoint, so this
    module never imports that one (no import cycle)."""

    def open_probe(self) -> _Probe: ...


class BrokerPool:
    """Hands out shared probes, one per endpoint; the operator has exactly one pool.

    Endpoints include the credentials, so a rotated password makes a new probe; the old
    one (and its connection) is closed once nothing has asked for it for
    ``idle_seconds`` — as is the probe of a deleted EmailQueue's broker.
    """

    def __init__(self, idle_seconds: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._probes: dict[str, dict[Any, Any]] = {"amqp": {}, "management": {}, "prometheus": {}}
        self._used: dict[tuple[str, Any], float] = {}
        self._swept_at = clock()

    def _get(self, kind: str, endpoint: _Endpoint, factory: Callable[[_Endpoint], _Made]) -> _Made:
        with self._lock:
            now = self.clock()
            table = self._probes[kind]
            probe = table.get(endpoint)
            if probe is None:
                probe = table[endpoint] = factory(endpoint)
            self._used[(kind, endpoint)] = now
            if now - self._swept_at >= min(60.0, self.idle_seconds):
                self._sweep(now)
            # A kind's table holds only what that kind's factory made.
            return cast(_Made, probe)

    def _sweep(self, now: float) -> None:
        """Close the probes nobody asked for within ``idle_seconds`` (called with the lock)."""
        self._swept_at = now
        for (kind, endpoint), used in list(self._used.items()):
            if now - used >= self.idle_seconds:
                probe = self._probes[kind].pop(endpoint, None)
                del self._used[(kind, endpoint)]
                if probe is not None:
                    probe.close()

    def amqp(self, endpoint: AmqpEndpoint) -> AmqpProbe:
        return self._get("amqp", endpoint, AmqpProbe)

    def management(self, endpoint: ManagementEndpoint) -> ManagementProbe:
        return self._get("management", endpoint, ManagementProbe)

    def prometheus(self, endpoint: OpensProbe[_Probe]) -> _Probe:
        """The shared probe of one Prometheus plugin endpoint (a rabbitmq_prometheus.PrometheusEndpoint)."""
        return self._get("prometheus", endpoint, lambda opener: opener.open_probe())

    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for probe in self._probes["amqp"].values() if probe.connected)

    def close(self) -> None:
        with self._lock:
            for table in self._probes.values():
                for probe in table.values():
                    probe.close()
                table.clear()
            self._used.clear()
