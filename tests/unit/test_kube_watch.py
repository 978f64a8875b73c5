"""kube.Reflector and kube.WatchedTargets: targets and HPAs from one LIST and a WATCH, not a
LIST per poll; a copy that is not current is an error with a reason, never an empty answer.

The I/O (LIST, WATCH) is replaced by a scripted source: each watch call takes the next
script from a queue (a list of events, or an exception to raise).
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from emailqueue_operator import kube


def deployment(name: str, replicas: int, ready: int = 0, rv: str = "1", namespace: str = "ns") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": rv},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}}},
            "status": {"readyReplicas": ready}}


def hpa(name: str, target: str, kind: str = "Deployment", namespace: str = "ns") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
            "spec": {"scaleTargetRef": {"kind": kind, "name": target}}}


class Source:
    """A scripted apiserver for one kind and scope."""

    def __init__(self, kind: str, namespace: str | None, listed: list[dict[str, Any]] | None = None) -> None:
        self.kind, self.namespace = kind, namespace
        self.listed = listed or []
        self.list_error: BaseException | None = None
        self.list_calls = 0
        self.watched_from: list[str] = []
        self.scripts: queue.Queue[list[dict[str, Any]] | BaseException] = queue.Queue()

    def list_objects(self) -> tuple[list[Mapping[str, Any]], str]:
        self.list_calls += 1
        if self.list_error is not None:
            raise self.list_error
        return list(self.listed), f"list-{self.list_calls}"

    def watch_objects(self, resource_version: str) -> Iterator[Mapping[str, Any]]:
        self.watched_from.append(resource_version)
        script = self.scripts.get()
        if isinstance(script, BaseException):
            raise script
        yield from script

    def close(self) -> None:
        self.scripts.put(kube.WatchGone("closed"))


def until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def reflector(source: Source) -> tuple[kube.Reflector[kube.TargetScale], threading.Thread]:
    made: kube.Reflector[kube.TargetScale] = kube.Reflector(
        "Deployments in namespace ns", source.list_objects, source.watch_objects,
        lambda obj: kube.target_of("Deployment", obj), backoff_cap=0.05)
    thread = threading.Thread(target=made.run, daemon=True)
    thread.start()
    return made, thread


def stop(made: kube.Reflector[Any], source: Source, thread: threading.Thread) -> None:
    made.stop()
    source.scripts.put([])
    thread.join(5)
    assert not thread.is_alive()


def test_one_list_then_watch_events_keep_the_copy_current_without_listing_again() -> None:
    source = Source("Deployment", "ns", [deployment("a", 1), deployment("b", 2)])
    made, thread = reflector(source)
    until(made.synced.is_set, "the first LIST")
    assert made.get(("ns", "a")) == kube.TargetScale("Deployment", "a", 1, 0, "app=a")
    source.scripts.put([{"type": "MODIFIED", "object": deployment("a", 4, ready=3, rv="7")},
                        {"type": "ADDED", "object": deployment("c", 0, rv="8")},
                        {"type": "DELETED", "object": deployment("b", 2, rv="9")}])
    # The apiserver ends a watch after timeoutSeconds: it resumes from the last version seen.
    source.scripts.put([{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}}])
    until(lambda: len(source.watched_from) >= 3, "the watch resumed twice")
    target = made.get(("ns", "a"))
    assert target is not None and (target.replicas, target.ready_replicas) == (4, 3)
    assert made.get(("ns", "b")) is None and made.get(("ns", "c")) is not None
    assert source.watched_from[:3] == ["list-1", "9", "12"]
    assert source.list_calls == 1 and made.synced.is_set()
    stop(made, source, thread)


def test_an_expired_watch_lists_again_and_stays_trusted() -> None:
    source = Source("Deployment", "ns", [deployment("a", 1)])
    made, thread = reflector(source)
    until(made.synced.is_set, "the first LIST")
    source.listed = [deployment("a", 5)]  # changed while the watch was expired
    source.scripts.put([{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}])
    until(lambda: source.list_calls == 2, "a relist after 410")
    until(lambda: (t := made.get(("ns", "a"))) is not None and t.replicas == 5, "the relisted value")
    assert made.synced.is_set() and made.error is None
    stop(made, source, thread)


def test_a_broken_watch_that_can_list_again_stays_trusted() -> None:
    source = Source("Deployment", "ns", [deployment("a", 1)])
    made, thread = reflector(source)
    until(made.synced.is_set, "the first LIST")
    source.scripts.put(ConnectionResetError("reset by peer"))
    until(lambda: source.list_calls == 2, "one immediate relist")
    assert made.synced.is_set() and made.error is None
    stop(made, source, thread)


def test_a_broken_watch_that_cannot_list_is_not_trusted_until_a_list_succeeds() -> None:
    source = Source("Deployment", "ns", [deployment("a", 1)])
    made, thread = reflector(source)
    until(made.synced.is_set, "the first LIST")
    source.list_error = ConnectionRefusedError("refused")
    source.scripts.put(ConnectionResetError("reset by peer"))
    until(lambda: not made.synced.is_set(), "the copy to be distrusted")
    assert made.error is not None and "ConnectionRefusedError" in made.error
    source.list_error = None
    until(made.synced.is_set, "trust after a successful LIST")
    assert made.error is None
    stop(made, source, thread)


class Targets:
    """WatchedTargets over scripted sources, remembering each source it made."""

    def __init__(self, listed: dict[str, list[dict[str, Any]]], cluster_wide: bool = False,
                 first_sync: float = 2.0, list_error: BaseException | None = None) -> None:
        self.listed, self.list_error = listed, list_error
        self.sources: list[Source] = []
        self.watched = kube.WatchedTargets(cluster_wide=cluster_wide, first_sync=first_sync, source=self.source)

    def source(self, kind: str, namespace: str | None) -> Source:
        made = Source(kind, namespace, self.listed.get(kind, []))
        made.list_error = self.list_error
        self.sources.append(made)
        return made


def test_targets_and_hpas_come_from_the_watched_copies() -> None:
    hpas = [hpa("rival", "w"), hpa("other", "x"), hpa("sts", "w", "StatefulSet")]
    targets = Targets({"Deployment": [deployment("w", 3, ready=2)], "HorizontalPodAutoscaler": hpas})
    try:
        read = targets.watched.read("ns", "Deployment", "w")
        assert (read.replicas, read.ready_replicas, read.selector) == (3, 2, "app=w")
        assert targets.watched.conflicting_hpas("ns", "Deployment", "w") == ["rival"]
        for _ in range(100):  # a hundred polls: no further LIST
            targets.watched.read("ns", "Deployment", "w")
            targets.watched.conflicting_hpas("ns", "Deployment", "w")
        assert [s.list_calls for s in targets.sources] == [1, 1]
        assert targets.watched.counts()["lists"] == 2
    finally:
        targets.watched.close()


def test_namespaced_watches_only_the_namespaces_read_and_cluster_wide_watches_once() -> None:
    per_namespace = Targets({"Deployment": [deployment("w", 1, namespace="a"), deployment("w", 2, namespace="b")]})
    cluster = Targets({"Deployment": [deployment("w", 1, namespace="a"), deployment("w", 2, namespace="b")]},
                      cluster_wide=True)
    try:
        per_namespace.watched.read("a", "Deployment", "w")
        assert [s.namespace for s in per_namespace.sources] == ["a"]
        per_namespace.watched.read("b", "Deployment", "w")
        assert [s.namespace for s in per_namespace.sources] == ["a", "b"]
        assert cluster.watched.read("a", "Deployment", "w").replicas == 1
        assert cluster.watched.read("b", "Deployment", "w").replicas == 2
        assert [s.namespace for s in cluster.sources] == [None]
    finally:
        per_namespace.watched.close()
        cluster.watched.close()


def test_a_copy_never_listed_is_an_error_with_its_reason_not_a_missing_target() -> None:
    targets = Targets({}, list_error=ConnectionRefusedError("apiserver down"))
    try:
        with pytest.raises(kube.TargetError) as err:
            targets.watched.read("ns", "Deployment", "w")
        assert err.value.reason == "TargetUnreadable"
        assert "Deployment ns targets unknown" in str(err.value) and "ConnectionRefusedError" in str(err.value)
        with pytest.raises(kube.TargetError) as hpa_err:
            targets.watched.conflicting_hpas("ns", "Deployment", "w")
        assert hpa_err.value.reason == "HpaUnreadable"
    finally:
        targets.watched.close()


def test_a_copy_whose_first_list_does_not_end_is_an_error_not_a_missing_target() -> None:
    targets = Targets({}, first_sync=0.1)
    started = threading.Event()
    release = threading.Event()

    def hanging(kind: str, namespace: str | None) -> Source:
        made = targets.source(kind, namespace)

        def slow_list() -> tuple[list[Mapping[str, Any]], str]:
            started.set()
            release.wait(5)
            return [], "1"

        made.list_objects = slow_list  # type: ignore[method-assign]
        return made

    watched = kube.WatchedTargets(first_sync=0.1, source=hanging)
    try:
        with pytest.raises(kube.TargetError) as err:
            watched.read("ns", "Deployment", "w")
        assert started.is_set() and err.value.reason == "TargetUnreadable" and "not listed within" in str(err.value)
    finally:
        release.set()
        watched.close()


def test_a_target_missing_from_the_copy_is_confirmed_by_one_get(monkeypatch: pytest.MonkeyPatch) -> None:
    gets: list[str] = []

    def read_target(namespace: str, kind: str, name: str) -> kube.TargetScale:
        gets.append(name)
        if name == "just-created":  # the watch event is still on its way
            return kube.TargetScale(kind, name, 2, 0, None)
        raise kube.TargetError(f"{kind} {namespace}/{name} not found")

    monkeypatch.setattr(kube, "read_target", read_target)
    targets = Targets({"Deployment": [deployment("w", 1)]})
    try:
        assert targets.watched.read("ns", "Deployment", "w").replicas == 1
        assert gets == []
        assert targets.watched.read("ns", "Deployment", "just-created").replicas == 2
        with pytest.raises(kube.TargetError) as err:
            targets.watched.read("ns", "Deployment", "gone")
        assert err.value.reason == "TargetNotFound"
        assert gets == ["just-created", "gone"]
    finally:
        targets.watched.close()


def test_where_rbac_forbids_watching_targets_are_read_by_get_and_hpas_do_not_block(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "read_target", lambda ns, kind, name: kube.TargetScale(kind, name, 4, 4, None))
    targets = Targets({}, first_sync=5.0, list_error=kube.Forbidden("HTTP 403 Forbidden: RBAC does not allow it"))
    try:
        t0 = time.monotonic()
        assert targets.watched.read("ns", "Deployment", "w").replicas == 4
        assert targets.watched.conflicting_hpas("ns", "Deployment", "w") == []
        assert time.monotonic() - t0 < 2.0  # a refusal is an answer: no wait for first_sync
    finally:
        targets.watched.close()


def test_unsupported_kind_is_refused_before_any_watch() -> None:
    targets = Targets({})
    with pytest.raises(kube.TargetError) as err:
        targets.watched.read("ns", "DaemonSet", "w")
    assert err.value.reason == "TargetKindUnsupported" and targets.sources == []


def test_the_api_connection_pool_has_room_for_every_poll_thread() -> None:
    # Fewer pooled connections than threads patching status at once: each extra connection
    # is discarded after its request and the next one pays a TLS handshake (seen at 1000
    # EmailQueues as "Connection pool is full, discarding connection").
    from emailqueue_operator import handlers

    assert kube.API_CONNECTIONS >= handlers.POLL_THREADS
