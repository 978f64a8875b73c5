"""The Prometheus-plugin probe without a broker: parsing real scrapes, counters → rates
across channel churn and resets, blind-not-zero, and credentials kept out of errors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests
import requests.adapters

from emailqueue_operator.rabbitmq import BrokerAuthError, BrokerError, QueueNotFound, TlsOptions
from emailqueue_operator.rabbitmq_prometheus import (
    PER_CHANNEL_COUNTERS,
    PER_QUEUE_COUNTERS,
    CounterAccumulator,
    MetricsMissing,
    PrometheusEndpoint,
    PrometheusProbe,
    QueueMetrics,
    Scrape,
    ScrapeUnparseable,
    parse_scrape,
    select_queues,
    series_increase,
    stats_from_scrape,
)

DATA = Path(__file__).parent / "data" / "prometheus"
SECRET = "pr0m-s3cr3t/:@%"


def _major(path: Path) -> int:
    return int(re.match(r"rabbitmq-(\d+)\.", path.name).group(1))


# --- parsing what real brokers serve ----------------------------------------------

# Every broker of the matrix was captured in the same state (emailqueue_testbed.prom_capture):
# queue 'emails' in vhost 't-prom-capture', 50 published, 25 delivered to a consumer with
# prefetch 5 that acked 20 and stays attached.
CAPTURE = {"ready": 25, "unacked": 5, "consumers": 1, "publish": 50, "deliver": 25, "ack": 20}
SCRAPES = sorted(DATA.glob("rabbitmq-*-detailed.txt"))


def test_the_captures_are_there():
    # both counter layouts: per channel (3.10) and per queue (4.x)
    assert {_major(p) >= 4 for p in SCRAPES} == {False, True}


@pytest.mark.parametrize("path", SCRAPES, ids=[p.name for p in SCRAPES])
def test_real_scrape_gauges_and_counters(path: Path):
    scrape = parse_scrape(path.read_text())
    queue = scrape.queues[("t-prom-capture", "emails")]
    assert (queue.ready, queue.unacked, queue.consumers) == (CAPTURE["ready"], CAPTURE["unacked"], CAPTURE["consumers"])
    for kind in ("publish", "deliver", "ack"):
        assert sum(queue.counters[kind].values()) == CAPTURE[kind], kind
    # 4.x counts per queue; 3.10 only per channel (each series names its channel).
    table = PER_QUEUE_COUNTERS if _major(path) >= 4 else PER_CHANNEL_COUNTERS
    assert scrape.counter_families == {kind: table[kind].family for kind in ("publish", "deliver", "ack")}
    assert scrape.per_queue_counters == (_major(path) >= 4)
    if _major(path) < 4:
        assert all(dict(labels).get("channel") for _, labels in queue.counters["ack"])


@pytest.mark.parametrize("path", SCRAPES, ids=[p.name for p in SCRAPES])
def test_real_scrape_through_the_probe(path: Path):
    # The same text served over the probe's session: one QueueStats, rates unknown (one scrape).
    probe = _probe(_Static(200, path.read_text()))
    stats = probe.queue_stats("t-prom-capture", "emails")
    assert (stats.ready, stats.unacked, stats.consumers) == (25, 5, 1)
    assert stats.publish_rate is None and stats.ack_rate is None and stats.deliver_rate is None
    assert stats.source == "prometheus" and stats.queues == ("emails",) and stats.oldest_age_seconds is None


SCRAPE_310 = """\
# TYPE rabbitmq_detailed_queue_messages_ready gauge
rabbitmq_detailed_queue_messages_ready{vhost="v",queue="emails"} 7
rabbitmq_detailed_queue_messages_ready{vhost="v",queue="other"} 1
# TYPE rabbitmq_detailed_queue_messages_unacked gauge
rabbitmq_detailed_queue_messages_unacked{vhost="v",queue="emails"} 2
rabbitmq_detailed_queue_messages_unacked{vhost="v",queue="other"} 0
# TYPE rabbitmq_detailed_queue_consumers gauge
rabbitmq_detailed_queue_consumers{vhost="v",queue="emails"} 2
rabbitmq_detailed_queue_consumers{vhost="v",queue="other"} 0
# TYPE rabbitmq_detailed_channel_get_ack_total counter
rabbitmq_detailed_channel_get_ack_total{channel="<0.1.0>",vhost="v",queue="emails"} 1
# TYPE rabbitmq_detailed_channel_get_total counter
# TYPE rabbitmq_detailed_channel_messages_delivered_ack_total counter
rabbitmq_detailed_channel_messages_delivered_ack_total{channel="<0.1.0>",vhost="v",queue="emails"} 10
rabbitmq_detailed_channel_messages_delivered_ack_total{channel="<0.2.0>",vhost="v",queue="emails"} 5
rabbitmq_detailed_channel_messages_delivered_ack_total{channel="<0.3.0>",vhost="w",queue="emails"} 99
# TYPE rabbitmq_detailed_channel_messages_delivered_total counter
# TYPE rabbitmq_detailed_channel_messages_acked_total counter
rabbitmq_detailed_channel_messages_acked_total{channel="<0.1.0>",vhost="v",queue="emails"} 9
rabbitmq_detailed_channel_messages_acked_total{channel="<0.2.0>",vhost="v",queue="emails"} 4
# TYPE rabbitmq_detailed_queue_messages_published_total counter
rabbitmq_detailed_queue_messages_published_total{channel="<0.4.0>",queue_vhost="v",queue="emails",exchange_vhost="v",exchange=""} 20
rabbitmq_detailed_queue_messages_published_total{channel="<0.4.0>",queue_vhost="v",queue="emails",exchange_vhost="v",exchange="mail"} 3
rabbitmq_detailed_queue_messages_published_total{channel="<0.5.0>",queue_vhost="w",queue="emails",exchange_vhost="w",exchange=""} 50
"""  # noqa: E501 (exposition lines as RabbitMQ writes them)

SCRAPE_4X = SCRAPE_310 + """\
# TYPE rabbitmq_detailed_queue_get_ack_total counter
# TYPE rabbitmq_detailed_queue_get_total counter
# TYPE rabbitmq_detailed_queue_messages_delivered_ack_total counter
rabbitmq_detailed_queue_messages_delivered_ack_total{vhost="v",queue="emails"} 30
# TYPE rabbitmq_detailed_queue_messages_delivered_total counter
rabbitmq_detailed_queue_messages_delivered_total{vhost="v",queue="emails"} 2
# TYPE rabbitmq_detailed_queue_messages_acked_total counter
rabbitmq_detailed_queue_messages_acked_total{vhost="v",queue="emails"} 28
# TYPE rabbitmq_detailed_queue_exchange_messages_published_total counter
rabbitmq_detailed_queue_exchange_messages_published_total{vhost="v",exchange="",queue="emails"} 40
rabbitmq_detailed_queue_exchange_messages_published_total{vhost="v",exchange="mail",queue="emails"} 4
"""


@pytest.mark.parametrize(("text", "publish", "deliver", "ack"), [
    # 3.10: summed over channels (and exchanges); the vhost is `vhost` in channel_queue_metrics
    # but `queue_vhost` in channel_queue_exchange_metrics; vhost w's series stay out of v
    (SCRAPE_310, 23, 16, 13),
    # 4.x: the per-queue families win over the per-channel ones the broker still serves
    (SCRAPE_4X, 44, 32, 28),
])
def test_counters_by_version(text, publish, deliver, ack):
    queue = parse_scrape(text).queues[("v", "emails")]
    assert {kind: sum(series.values()) for kind, series in queue.counters.items()} == \
        {"publish": publish, "deliver": deliver, "ack": ack}


def test_queue_without_traffic_has_empty_counters_not_missing_ones():
    queue = parse_scrape(SCRAPE_310).queues[("v", "other")]
    assert queue.counters == {"publish": {}, "deliver": {}, "ack": {}}


def test_missing_gauge_is_none_in_the_parse():
    text = SCRAPE_310.replace('rabbitmq_detailed_queue_consumers{vhost="v",queue="emails"} 2\n', "")
    queue = parse_scrape(text).queues[("v", "emails")]
    assert queue.consumers is None and queue.ready == 7


def test_nan_gauge_is_missing_not_a_number():
    text = SCRAPE_310.replace('unacked{vhost="v",queue="emails"} 2', 'unacked{vhost="v",queue="emails"} NaN')
    assert parse_scrape(text).queues[("v", "emails")].unacked is None


def test_gauge_without_queue_label_is_a_parse_error():
    with pytest.raises(ValueError, match="label"):
        parse_scrape("# TYPE rabbitmq_detailed_queue_messages_ready gauge\n"
                     'rabbitmq_detailed_queue_messages_ready{vhost="v"} 1\n')


@pytest.mark.parametrize(("names", "queue", "regex", "selected"), [
    (["emails", "emails-b", "other"], "emails", None, ["emails"]),      # exact name
    (["Emails", "other"], "emails", None, []),                          # a name is case-sensitive
    (["emails", "other"], "nope", None, []),                           # absent
    # a regex is searched, unanchored and case-insensitive, as RabbitMQ's use_regex (and KEDA) does
    (["emails-a", "emails-b", "x-emails-c"], None, r"emails-.*", ["emails-a", "emails-b", "x-emails-c"]),
    (["emails-a", "EMAILS-b", "other"], None, r"emails", ["EMAILS-b", "emails-a"]),
    (["emails-a", "emails-b", "x-emails-c"], None, r"^emails-.*$", ["emails-a", "emails-b"]),  # anchored: whole names
    (["emails-a"], None, r"^nothing$", []),
])
def test_select_queues_searches_like_rabbitmq(names, queue, regex, selected):
    assert select_queues(names, queue, regex) == selected


def test_both_probes_share_one_queue_selection():
    from emailqueue_operator import rabbitmq, rabbitmq_prometheus
    assert rabbitmq_prometheus.select_queues is rabbitmq.select_queues


# --- counters → rates -------------------------------------------------------------

CH = lambda n: ("ack", (("channel", f"<0.{n}.0>"),))  # noqa: E731 - a series key of channel n


@pytest.mark.parametrize(("previous", "current", "increase"), [
    ({CH(1): 10}, {CH(1): 15}, 5),                  # a series grows
    ({CH(1): 10}, {CH(1): 10, CH(2): 4}, 4),         # a channel opened after the last scrape: all of it counts
    ({CH(1): 10, CH(2): 4}, {CH(2): 6}, 2),          # a channel closed: it adds nothing more, no negative
    ({CH(1): 10}, {CH(1): 3}, 3),                    # reset (broker restart): the new value is the increase
    ({}, {}, 0),                                     # no traffic
])
def test_series_increase(previous, current, increase):
    assert series_increase(previous, current) == increase


def _scrape(ack_series: dict, queue: str = "emails", family: str = "channel_queue_metrics") -> Scrape:
    return Scrape(queues={("v", queue): QueueMetrics(1, 0, 1, {"ack": ack_series})}, counter_families={"ack": family})


def test_accumulator_survives_channel_churn():
    acc = CounterAccumulator()
    acc.observe(0, _scrape({CH(1): 100}))             # baseline: what happened before is not a rate
    acc.observe(5, _scrape({CH(1): 120}))             # +20
    acc.observe(10, _scrape({CH(2): 15}))             # channel 1 closed, 2 opened: +15
    acc.observe(15, _scrape({CH(2): 40, CH(3): 10}))  # +25 and a new channel +10
    assert [v for _, v in acc.samples("v", "emails", "ack")] == [0, 20, 35, 70]
    assert acc.rate("v", "emails", "ack", now=15, window=10) == pytest.approx((70 - 20) / 10)


def test_accumulator_counter_reset_counts_new_value():
    acc = CounterAccumulator()
    acc.observe(0, _scrape({CH(1): 500}))
    acc.observe(5, _scrape({CH(1): 550}))  # +50
    acc.observe(10, _scrape({CH(1): 30}))  # restarted: +30, never -520
    assert acc.rate("v", "emails", "ack", now=10, window=10) == pytest.approx(8.0)


def test_rate_unknown_until_the_window_has_two_scrapes():
    acc = CounterAccumulator()
    acc.observe(0, _scrape({CH(1): 100}))
    assert acc.rate("v", "emails", "ack", now=0, window=10) is None
    acc.observe(2, _scrape({CH(1): 104}))  # 2 s apart: under half the window
    assert acc.rate("v", "emails", "ack", now=2, window=10) is None
    acc.observe(6, _scrape({CH(1): 112}))
    assert acc.rate("v", "emails", "ack", now=6, window=10) == pytest.approx(2.0)


def test_queue_deleted_and_recreated_starts_afresh():
    acc = CounterAccumulator()
    acc.observe(0, _scrape({CH(1): 100}))
    acc.observe(5, Scrape(queues={}, counter_families={"ack": "channel_queue_metrics"}))  # deleted
    acc.observe(10, _scrape({CH(1): 7}))
    assert acc.samples("v", "emails", "ack") == [(10, 0.0)]


def test_counters_moving_to_another_family_restart_the_window():
    # e.g. an upgrade to 4.x: the per-queue totals are not increases over the channel sums
    acc = CounterAccumulator()
    acc.observe(0, _scrape({CH(1): 100}))
    acc.observe(5, _scrape({("q", ()): 5000}, family="queue_delivery_metrics"))
    assert acc.samples("v", "emails", "ack") == [(5, 0.0)]


def test_history_is_trimmed_but_keeps_the_window_start():
    acc = CounterAccumulator(keep_seconds=10)
    for t in range(0, 60, 5):
        acc.observe(t, _scrape({CH(1): t}))
    times = [t for t, _ in acc.samples("v", "emails", "ack")]
    assert times[0] == 45 and times[-1] == 55
    assert acc.rate("v", "emails", "ack", now=55, window=10) == pytest.approx(1.0)


# --- blind, never zero --------------------------------------------------------------

def test_missing_gauge_is_blind_not_zero():
    text = SCRAPE_310.replace('rabbitmq_detailed_queue_messages_unacked{vhost="v",queue="emails"} 2\n', "")
    scrape = parse_scrape(text)
    with pytest.raises(MetricsMissing, match="missing rabbitmq_detailed_queue_messages_unacked") as exc:
        stats_from_scrape(scrape, CounterAccumulator(), "v", ["emails"], "sum", 0, 10, "rabbit:15692")
    assert isinstance(exc.value, BrokerError)
    with pytest.raises(MetricsMissing):
        _probe(_Static(200, text)).queue_stats("v", "emails")


def test_regex_aggregates_and_an_unknown_rate_is_not_summed_as_zero():
    scrape = parse_scrape(SCRAPE_310)
    acc = CounterAccumulator()
    acc.observe(0, scrape)
    acc.observe(10, scrape)
    both = stats_from_scrape(scrape, acc, "v", ["emails", "other"], "sum", 10, 10, "d")
    assert (both.ready, both.unacked, both.consumers) == (8, 2, 2) and both.ack_rate == 0.0
    # composed as KEDA composes them (rabbitmq.combine_counts): max is the fullest single queue
    # (emails: 7 ready + 2 unacked = 9), avg the truncated per-queue average ((9 + 1) // 2 = 5)
    biggest = stats_from_scrape(scrape, acc, "v", ["emails", "other"], "max", 10, 10, "d")
    assert (biggest.ready, biggest.ready + biggest.unacked, biggest.consumers) == (7, 9, 2)
    average = stats_from_scrape(scrape, acc, "v", ["emails", "other"], "avg", 10, 10, "d")
    assert (average.ready, average.ready + average.unacked, average.consumers) == (4, 5, 1)
    fresh = CounterAccumulator()
    fresh.observe(0, _scrape({}, queue="emails"))
    fresh.observe(10, scrape)  # 'other' first seen now: its rate is unknown, so is the sum
    assert stats_from_scrape(scrape, fresh, "v", ["emails", "other"], "sum", 10, 10, "d").ack_rate is None


class _Static(requests.adapters.BaseAdapter):
    """A transport that answers every request with one canned response (no network)."""

    def __init__(self, status: int, body: str | bytes, content_type: str = "text/plain; version=0.0.4",
                 error: Exception | None = None) -> None:
        super().__init__()
        self.status, self.body, self.content_type, self.error = status, body, content_type, error
        self.sent: list[requests.PreparedRequest] = []

    def send(self, request, **kwargs):
        self.sent.append(request)
        if self.error is not None:
            raise self.error
        resp = requests.Response()
        resp.status_code, resp.request, resp.url = self.status, request, request.url
        resp._content = self.body.encode() if isinstance(self.body, str) else self.body
        resp.headers["Content-Type"] = self.content_type
        resp.encoding = "utf-8"
        return resp

    def close(self):
        pass


def _probe(adapter: _Static, now: list[float] | None = None, **kwargs) -> PrometheusProbe:
    clock = (lambda: now[0]) if now is not None else None
    probe = PrometheusProbe(PrometheusEndpoint("http://rabbit:15692", "operator", SECRET),
                            **({"clock": clock} if clock else {}), **kwargs)
    probe._session.mount("http://", adapter)
    return probe


HTML = "<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please log in</body></html>\n"


@pytest.mark.parametrize(("adapter", "error", "message"), [
    # a proxy's login page with 200: the parser raises, the probe reports it
    (_Static(200, HTML, "text/html"), ScrapeUnparseable, "did not answer with Prometheus text"),
    # JSON (the management API's port by mistake)
    (_Static(200, '{"error":"not_found"}', "application/json"), ScrapeUnparseable, "Prometheus text"),
    # an empty 200 parses to nothing: no gauges declared is not "no queues"
    (_Static(200, ""), MetricsMissing, "missing the queue gauges"),
    # not UTF-8 at all
    (_Static(200, b"\xff\xfe\x00garbage\x00"), BrokerError, "rabbit:15692"),
    (_Static(401, "unauthorized"), BrokerAuthError, "HTTP 401"),
    (_Static(503, "busy"), BrokerError, "HTTP 503"),
    (_Static(404, "Unknown Registry"), BrokerError, "HTTP 404 \\(is it the rabbitmq_prometheus listener"),
    (_Static(200, "", error=requests.ConnectTimeout("http://operator:pr0m-s3cr3t@rabbit")), BrokerError,
     "unreachable \\(ConnectTimeout\\)"),
    (_Static(200, "", error=requests.ConnectionError("refused")), BrokerError, "unreachable"),
])
def test_failures_are_broker_errors_without_credentials(adapter, error, message):
    probe = _probe(adapter)
    with pytest.raises(error, match=message) as exc:
        probe.queue_stats("v", "emails")
    assert isinstance(exc.value, BrokerError)
    assert SECRET not in str(exc.value) and "operator" not in str(exc.value)
    # and the next poll does not hammer the endpoint: it waits out the backoff
    with pytest.raises(BrokerError, match="next attempt in"):
        probe.queue_stats("v", "emails")
    assert len(adapter.sent) == 1


def test_absent_queue_is_not_found():
    probe = _probe(_Static(200, SCRAPE_310))
    with pytest.raises(QueueNotFound, match="'nope' not found in vhost 'v'"):
        probe.queue_stats("v", "nope")
    with pytest.raises(QueueNotFound, match="no queue matches"):
        probe.queue_stats("v", queue_regex=r"nomatch-.*")


def test_vhost_without_queues_is_not_found_not_a_format_error():
    # what 3.10.8 answers for ?vhost=<a vhost with no queues>: the families, no samples
    empty = "\n".join(line for line in SCRAPE_310.splitlines() if line.startswith("#")) + "\n"
    with pytest.raises(QueueNotFound):
        _probe(_Static(200, empty)).queue_stats("v", "emails")


def test_one_scrape_per_vhost_serves_every_poll_within_the_cache():
    now = [100.0]
    adapter = _Static(200, SCRAPE_310)
    probe = _probe(adapter, now=now, cache_seconds=1.0)
    for _ in range(100):
        probe.queue_stats("v", "emails")
        probe.queue_stats("v", queue_regex="emails|other")
    assert len(adapter.sent) == 1
    sent = adapter.sent[0]
    assert sent.url.startswith("http://rabbit:15692/metrics/detailed?vhost=v&family=queue_coarse_metrics")
    assert "family=channel_queue_metrics" in sent.url and "family=queue_delivery_metrics" in sent.url
    assert sent.headers["Authorization"].startswith("Basic ")
    now[0] += 1.5
    probe.queue_stats("v", "emails")
    assert len(adapter.sent) == 2


def test_rates_over_successive_scrapes_through_the_probe():
    now = [0.0]
    adapter = _Static(200, SCRAPE_310)
    probe = _probe(adapter, now=now)
    assert probe.queue_stats("v", "emails").ack_rate is None
    now[0] = 10.0
    adapter.body = SCRAPE_310.replace('acked_total{channel="<0.2.0>",vhost="v",queue="emails"} 4',
                                      'acked_total{channel="<0.2.0>",vhost="v",queue="emails"} 24')
    stats = probe.queue_stats("v", "emails", window_seconds=10)
    assert stats.ack_rate == pytest.approx(2.0) and stats.publish_rate == 0.0 and stats.deliver_rate == 0.0


def test_per_channel_families_dropped_once_the_broker_counts_per_queue():
    now = [0.0]
    adapter = _Static(200, SCRAPE_4X)
    probe = _probe(adapter, now=now)
    probe.queue_stats("v", "emails")
    now[0] = 5.0
    probe.queue_stats("v", "emails")
    assert "channel_queue_metrics" in adapter.sent[0].url and "channel_queue_metrics" not in adapter.sent[1].url


# --- credentials --------------------------------------------------------------------

def test_credentials_never_in_repr_or_display():
    ep = PrometheusEndpoint("https://rabbit.example:15691", "operator", SECRET, TlsOptions(enabled=True))
    assert SECRET not in repr(ep) and SECRET not in ep.display and "operator" not in ep.display
    assert ep.display == "rabbit.example:15691"
    assert SECRET not in repr(PrometheusProbe(ep).endpoint)


@pytest.mark.parametrize("url", [
    f"http://operator:{SECRET}@rabbit:15692",   # credentials belong in the Secret's keys
    "amqp://rabbit:5672",                          # not HTTP
    "http://rabbit:notaport",                      # malformed
])
def test_bad_urls_are_refused_without_echoing_them(url):
    with pytest.raises(BrokerError) as exc:
        PrometheusEndpoint(url, "operator", SECRET)
    assert SECRET not in str(exc.value) and "notaport" not in str(exc.value)


@pytest.mark.parametrize(("url", "metrics_url"), [
    ("http://rabbit:15692", "http://rabbit:15692/metrics/detailed"),
    ("http://rabbit:15692/", "http://rabbit:15692/metrics/detailed"),
    ("http://rabbit:15692/metrics", "http://rabbit:15692/metrics/detailed"),
    ("https://proxy/rabbit/metrics/detailed", "https://proxy/rabbit/metrics/detailed"),
])
def test_metrics_url(url, metrics_url):
    assert PrometheusEndpoint(url).metrics_url == metrics_url


def test_no_username_sends_no_auth():
    adapter = _Static(200, SCRAPE_310)
    probe = PrometheusProbe(PrometheusEndpoint("http://rabbit:15692"))
    probe._session.mount("http://", adapter)
    probe.queue_stats("v", "emails")
    assert "Authorization" not in adapter.sent[0].headers


def test_invalid_regex_is_a_broker_error():
    with pytest.raises(BrokerError, match="not a valid regular expression"):
        _probe(_Static(200, SCRAPE_310)).queue_stats("v", queue_regex="emails-(")
