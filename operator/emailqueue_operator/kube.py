"""Kubernetes I/O: the scale target's `/scale`, Secrets, and EmailQueue status.

The only module that reads or patches the worker Deployment/StatefulSet. Targets and
HorizontalPodAutoscalers are read from watched copies (`WatchedTargets`: one LIST, then a
WATCH per kind and namespace), not listed per poll. Errors are translated to
`TargetError` / `SecretError` with messages fit for a condition.
"""
from __future__ import annotations

import base64
import functools
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from email_worker.backoff import backoff_delay

GROUP, VERSION, PLURAL = "emailqueue.dev", "v1alpha1", "emailqueues"


class _ReasonedError(Exception):
    """An error whose `reason` becomes the condition's reason (CamelCase, like Kubernetes)."""

    reason = "Error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class TargetError(_ReasonedError):
    reason = "TargetNotFound"


class SecretError(_ReasonedError):
    reason = "SecretNotFound"


@dataclass(frozen=True, slots=True)
class TargetScale:
    """What the target looks like now: desired replicas (/scale) and how many are ready."""

    kind: str
    name: str
    replicas: int
    ready_replicas: int
    selector: str | None


_api_lock = threading.Lock()
_api: client.ApiClient | None = None

API_CONNECTIONS = 24
"""Connections the shared ApiClient keeps open: at least as many as threads that call the
API at once (handlers.POLL_THREADS). The client's default is 5 per core; a full pool
discards each extra connection and the next request pays a new TLS handshake."""


def api_client() -> client.ApiClient:
    """One ApiClient for the process (in-cluster config, else the kubeconfig)."""
    global _api
    with _api_lock:
        if _api is None:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            configuration = client.Configuration.get_default_copy()
            configuration.connection_pool_maxsize = API_CONNECTIONS
            _api = client.ApiClient(configuration)
        return _api


def drain(resp: Any) -> bytes:
    """Read a raw (`_preload_content=False`) response and give its connection back to the
    pool; an unreleased one makes the next request open a new TLS connection."""
    try:
        data: bytes = resp.data
        return data
    finally:
        resp.release_conn()


def _apps() -> client.AppsV1Api:
    return client.AppsV1Api(api_client())


def _check_kind(kind: str) -> None:
    if kind not in ("Deployment", "StatefulSet"):
        raise TargetError(f"scaleTargetRef.kind {kind!r} is not supported (Deployment or StatefulSet)",
                          "TargetKindUnsupported")


@dataclass(frozen=True, slots=True)
class HpaRef:
    """What a HorizontalPodAutoscaler scales."""

    namespace: str
    name: str
    kind: str
    target: str


def hpa_of(obj: Mapping[str, Any]) -> HpaRef:
    meta, ref = obj.get("metadata") or {}, (obj.get("spec") or {}).get("scaleTargetRef") or {}
    return HpaRef(namespace=str(meta.get("namespace") or ""), name=str(meta.get("name") or ""),
                  kind=str(ref.get("kind") or ""), target=str(ref.get("name") or ""))


def target_of(kind: str, obj: Mapping[str, Any]) -> TargetScale:
    """The scale view of a Deployment/StatefulSet object (as listed, watched or read)."""
    name = str((obj.get("metadata") or {}).get("name") or "")
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or None
    replicas = spec.get("replicas")
    return TargetScale(kind=kind, name=name, replicas=int(1 if replicas is None else replicas),
                       ready_replicas=int(status.get("readyReplicas") or 0), selector=selector)


def read_target(namespace: str, kind: str, name: str) -> TargetScale:
    """One target by GET (raw JSON: the client's model deserialisation costs more than a poll)."""
    _check_kind(kind)
    apps = _apps()
    resp: Any
    try:
        if kind == "Deployment":
            resp = apps.read_namespaced_deployment(name, namespace, _request_timeout=10, _preload_content=False)
        else:
            resp = apps.read_namespaced_stateful_set(name, namespace, _request_timeout=10, _preload_content=False)
        obj = json.loads(drain(resp))
    except ApiException as exc:
        if exc.status == 404:
            raise TargetError(f"{kind} {namespace}/{name} not found") from None
        raise TargetError(f"reading {kind} {namespace}/{name} failed: HTTP {exc.status} {exc.reason}",
                          "TargetUnreadable") from None
    return target_of(kind, obj)


def scale_target(namespace: str, kind: str, name: str, replicas: int) -> None:
    """Patch the target's /scale subresource (the only write the operator makes to it)."""
    apps = _apps()
    body = {"spec": {"replicas": int(replicas)}}
    try:
        if kind == "Deployment":
            drain(apps.patch_namespaced_deployment_scale(name, namespace, body, _request_timeout=10,
                                                          _preload_content=False))
        else:
            drain(apps.patch_namespaced_stateful_set_scale(name, namespace, body, _request_timeout=10,
                                                            _preload_content=False))
    except ApiException as exc:
        raise TargetError(f"scaling {kind} {namespace}/{name} to {replicas} failed: HTTP {exc.status} {exc.reason}",
                          "ScaleFailed") from None


class SecretCache:
    """Reads Secrets through a short cache so a thousand resources do not hammer the API."""

    def __init__(self, ttl: float = 30.0) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}

    def read(self, namespace: str, name: str) -> dict[str, str]:
        key = (namespace, name)
        with self._lock:
            entry = self._entries.get(key)
            if entry and time.monotonic() - entry[0] < self.ttl:
                return entry[1]
        try:
            secret = client.CoreV1Api(api_client()).read_namespaced_secret(name, namespace, _request_timeout=10)
        except ApiException as exc:
            if exc.status == 404:
                raise SecretError(f"Secret {namespace}/{name} not found") from None
            raise SecretError(f"reading Secret {namespace}/{name} failed: HTTP {exc.status} {exc.reason}",
                              "SecretUnreadable") from None
        data = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (secret.data or {}).items()}
        data.update(secret.string_data or {})
        with self._lock:
            self._entries[key] = (time.monotonic(), data)
        return data

    def invalidate(self, namespace: str, name: str) -> None:
        with self._lock:
            self._entries.pop((namespace, name), None)


def secret_value(data: Mapping[str, str], namespace: str, name: str, key: str) -> str:
    if key not in data:
        raise SecretError(f"Secret {namespace}/{name} has no key {key!r}", "SecretKeyMissing")
    return data[key]


def patch_status(namespace: str, name: str, status: Mapping[str, Any]) -> None:
    """Merge-patch the EmailQueue's status subresource."""
    api = client.CustomObjectsApi(api_client())
    try:
        drain(api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name,
                                                         {"status": dict(status)}, _request_timeout=10,
                                                         _preload_content=False))
    except ApiException as exc:
        if exc.status == 404:
            return  # deleted meanwhile: nothing to report on
        raise


# --- watched copies of the scale targets and the HPAs --------------------------------------

V = TypeVar("V")
ObjectKey = tuple[str, str]
"""(namespace, name) of a watched object."""


class WatchGone(Exception):
    """HTTP 410 (or a watch ERROR event with code 410): the resourceVersion is too old; list again."""


class Forbidden(Exception):
    """HTTP 403 on LIST/WATCH: RBAC does not allow watching this kind here."""


def _key_of(obj: Mapping[str, Any]) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class Reflector(Generic[V]):
    """A local copy of one kind of object in one namespace (or all), kept by one LIST and a WATCH.

    `run` (a thread of its own) lists once, then applies watch events; a stream the
    apiserver ends normally is resumed from the last resourceVersion (bookmarks keep it
    fresh), so nothing is listed again until the watch expires (410) or breaks. A broken
    watch is followed by one immediate relist; if that LIST fails too, the copy is no longer
    trusted: `synced` clears and `error` says why, until a LIST succeeds again (with backoff).
    Only `convert`'s small values are kept, not the objects. I/O is passed in
    (`list_objects`, `watch_objects`), so the bookkeeping is testable without an apiserver.
    """

    def __init__(self, what: str, list_objects: Callable[[], tuple[list[Mapping[str, Any]], str]],
                 watch_objects: Callable[[str], Iterable[Mapping[str, Any]]],
                 convert: Callable[[Mapping[str, Any]], V], backoff_cap: float = 30.0,
                 forbidden_retry: float = 300.0) -> None:
        self.what = what
        self._list_objects, self._watch_objects, self._convert = list_objects, watch_objects, convert
        self._backoff_cap, self._forbidden_retry = backoff_cap, forbidden_retry
        self._lock = threading.Lock()
        self._values: dict[ObjectKey, V] = {}
        self.synced = threading.Event()
        """Set while the copy is current: listed, and the watch running or being resumed."""
        self.error: str | None = None
        """Why the copy is not trusted (None: it is, or the first LIST has not ended yet)."""
        self.forbidden = False
        """The last LIST was refused by RBAC (readers fall back to GETs)."""
        self.attempted = threading.Event()
        """Set once the first LIST has ended, whatever its outcome."""
        self.lists = 0
        self.watches = 0
        self.stopped = threading.Event()

    def get(self, key: ObjectKey) -> V | None:
        with self._lock:
            return self._values.get(key)

    def values(self) -> list[V]:
        with self._lock:
            return list(self._values.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    def stop(self) -> None:
        self.stopped.set()

    def _replace(self, objects: Iterable[Mapping[str, Any]]) -> None:
        values = {_key_of(obj): self._convert(obj) for obj in objects}
        with self._lock:
            self._values = values

    def _apply(self, event: Mapping[str, Any]) -> str | None:
        """Apply one watch event; returns the resourceVersion it carries (None: none)."""
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise WatchGone(str(obj.get("message") or "resourceVersion too old"))
            raise RuntimeError(f"watch error {code}: {obj.get('message') or obj.get('reason') or 'unknown'}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            value = self._convert(obj)
            with self._lock:
                self._values[_key_of(obj)] = value
        elif kind == "DELETED":
            with self._lock:
                self._values.pop(_key_of(obj), None)
        return str(rv) if rv else None

    def run(self) -> None:
        """List, then watch, until stopped (the body of the reflector's thread)."""
        rv: str | None = None
        failures = 0
        while not self.stopped.is_set():
            try:
                if rv is None:
                    objects, rv = self._list_objects()
                    self.lists += 1
                    self._replace(objects)
                    self.forbidden, self.error, failures = False, None, 0
                    self.synced.set()
                    self.attempted.set()
                self.watches += 1
                for event in self._watch_objects(rv):
                    if self.stopped.is_set():
                        return
                    rv = self._apply(event) or rv
                failures = 0  # the apiserver ended the stream (timeoutSeconds): resume from rv
            except WatchGone:
                rv = None  # expired: list again at once, the copy stays trusted meanwhile
            except Forbidden as exc:
                rv = None
                self.forbidden = True
                self.synced.clear()
                self.error = str(exc)
                self.attempted.set()
                self.stopped.wait(self._forbidden_retry)
            except Exception as exc:  # connection lost, apiserver down, bad answer
                message = f"watching {self.what} failed: {_describe(exc)}"
                listing = rv is None
                rv = None
                failures += 1
                if listing or failures > 1:
                    self.synced.clear()
                    self.error = message
                    self.attempted.set()
                    base = min(0.5, self._backoff_cap)
                    self.stopped.wait(backoff_delay(failures, base, self._backoff_cap, jitter=0.2))
                # else: one immediate relist decides whether the copy is still current


def _describe(exc: BaseException) -> str:
    """A failure's text without anything the client may have put in it (URLs, headers)."""
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    if isinstance(exc, (RuntimeError, WatchGone, Forbidden)):
        return str(exc)
    return type(exc).__name__


# Watches are ended by the apiserver after this long and resumed from their resourceVersion;
# bookmarks keep that version from expiring in between.
WATCH_SECONDS = 290
LIST_PAGE = 500
"""Objects per LIST page: the first listing of 5000 Deployments is not held in memory at once."""


class _KubeSource:
    """LIST and WATCH of one resource kind through the kubernetes client, raw JSON.

    One ApiClient per watched kind and scope: a watch holds its connection for minutes and
    must not take one from the pool the polls use.
    """

    def __init__(self, kind: str, namespace: str | None) -> None:
        self.kind, self.namespace = kind, namespace
        api_client()  # loads the configuration once
        self._client = client.ApiClient(client.Configuration.get_default_copy())
        self._response: Any = None

    def _call(self, **kwargs: Any) -> Any:
        ns = self.namespace
        if self.kind == "HorizontalPodAutoscaler":
            hpa = client.AutoscalingV2Api(self._client)
            if ns is None:
                return hpa.list_horizontal_pod_autoscaler_for_all_namespaces(_preload_content=False, **kwargs)
            return hpa.list_namespaced_horizontal_pod_autoscaler(ns, _preload_content=False, **kwargs)
        apps = client.AppsV1Api(self._client)
        if self.kind == "Deployment":
            if ns is None:
                return apps.list_deployment_for_all_namespaces(_preload_content=False, **kwargs)
            return apps.list_namespaced_deployment(ns, _preload_content=False, **kwargs)
        if ns is None:
            return apps.list_stateful_set_for_all_namespaces(_preload_content=False, **kwargs)
        return apps.list_namespaced_stateful_set(ns, _preload_content=False, **kwargs)

    @staticmethod
    def _raise(exc: ApiException) -> None:
        if exc.status == 410:
            raise WatchGone("resourceVersion expired") from None
        if exc.status == 403:
            raise Forbidden(f"HTTP 403 {exc.reason}: RBAC does not allow listing and watching") from None
        raise exc

    def list_objects(self) -> tuple[list[Mapping[str, Any]], str]:
        objects: list[Mapping[str, Any]] = []
        token: str | None = None
        while True:
            try:
                kwargs: dict[str, Any] = {"limit": LIST_PAGE, "_request_timeout": 60}
                if token:
                    kwargs["_continue"] = token
                page = json.loads(drain(self._call(**kwargs)))
            except ApiException as exc:
                self._raise(exc)
                raise
            objects.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return objects, str(meta.get("resourceVersion") or "")

    def watch_objects(self, resource_version: str) -> Iterator[Mapping[str, Any]]:
        try:
            resp = self._call(watch=True, resource_version=resource_version, allow_watch_bookmarks=True,
                              timeout_seconds=WATCH_SECONDS, _request_timeout=(10, WATCH_SECONDS + 30))
        except ApiException as exc:
            self._raise(exc)
            raise
        self._response = resp
        try:
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                yield json.loads(line)
        finally:
            # Closed, not returned as is: a stream left mid-way (an ERROR event, a stop) must
            # not be reused for the next request. One reconnect per watch is nothing.
            self._response = None
            resp.close()
            resp.release_conn()

    def close(self) -> None:
        resp = self._response
        if resp is not None:
            try:
                resp.shutdown() if hasattr(resp, "shutdown") else resp.close()
            except Exception:  # closing a stream that already ended
                pass


class TargetReader(Protocol):
    """Where a poll reads its target and the autoscalers that compete for it."""

    def read(self, namespace: str, kind: str, name: str) -> TargetScale: ...

    def conflicting_hpas(self, namespace: str, kind: str, name: str) -> list[str]: ...


class WatchedTargets:
    """Scale targets and HorizontalPodAutoscalers as the operator last heard of them: one
    Reflector (LIST once, then WATCH) per kind and namespace, started at the first read.

    Replaces a LIST every 2 s per namespace (targets) and every 15 s (HPAs): between
    changes the apiserver is asked nothing. Per namespace by default, so a namespaced
    operator (`--namespace`) watches only what its Role lets it; `cluster_wide=True` watches
    each kind once for all namespaces (an operator with `--all-namespaces`).

    A target is an error, never a guess: a copy not listed yet (after `first_sync` seconds)
    or whose watch broke and cannot list again raises TargetError TargetUnreadable with the
    reason; a target absent from a current copy is confirmed by one GET (the watch may be a
    few milliseconds behind an EmailQueue created with its Deployment) before TargetNotFound.
    Where RBAC forbids LIST/WATCH, targets are read by GET, as before.
    """

    def __init__(self, cluster_wide: bool = False, first_sync: float = 10.0,
                 source: Callable[[str, str | None], Any] = _KubeSource) -> None:
        self.cluster_wide = cluster_wide
        self.first_sync = first_sync
        self._source = source
        self._lock = threading.Lock()
        self._reflectors: dict[tuple[str, str | None], Reflector[Any]] = {}
        self._sources: list[Any] = []

    def reflector(self, kind: str, namespace: str) -> Reflector[Any]:
        scope = None if self.cluster_wide else namespace
        key = (kind, scope)
        with self._lock:
            found = self._reflectors.get(key)
            if found is not None:
                return found
            source = self._source(kind, scope)
            convert: Callable[[Mapping[str, Any]], Any] = (
                hpa_of if kind == "HorizontalPodAutoscaler" else functools.partial(target_of, kind))
            where = "all namespaces" if scope is None else f"namespace {scope}"
            made: Reflector[Any] = Reflector(f"{kind}s in {where}", source.list_objects, source.watch_objects,
                                             convert)
            self._reflectors[key] = made
            self._sources.append(source)
        threading.Thread(target=made.run, name=f"watch-{kind}-{scope or '*'}", daemon=True).start()
        return made

    def _current(self, kind: str, namespace: str) -> Reflector[Any] | None:
        """The kind's reflector once it is current; None when RBAC forbids watching it.
        Raises TargetError when the copy cannot be trusted."""
        reflector = self.reflector(kind, namespace)
        reflector.attempted.wait(self.first_sync)
        if reflector.forbidden:
            return None
        if not reflector.synced.is_set():
            why = reflector.error or f"not listed within {self.first_sync:g} s"
            raise TargetError(f"{kind} {namespace} targets unknown: {why}", "TargetUnreadable")
        return reflector

    def read(self, namespace: str, kind: str, name: str) -> TargetScale:
        _check_kind(kind)
        reflector = self._current(kind, namespace)
        if reflector is None:
            return read_target(namespace, kind, name)
        target: TargetScale | None = reflector.get((namespace, name))
        return target if target is not None else read_target(namespace, kind, name)

    def conflicting_hpas(self, namespace: str, kind: str, name: str) -> list[str]:
        """HorizontalPodAutoscalers in the namespace that scale the same target. Empty when
        RBAC forbids reading HPAs (they must not stop scaling); TargetError HpaUnreadable when
        the watch is broken (the caller decides)."""
        try:
            reflector = self._current("HorizontalPodAutoscaler", namespace)
        except TargetError as exc:
            raise TargetError(str(exc), "HpaUnreadable") from None
        if reflector is None:
            return []
        return sorted(hpa.name for hpa in reflector.values()
                      if hpa.namespace == namespace and hpa.kind == kind and hpa.target == name)

    def counts(self) -> dict[str, int]:
        """LISTs and WATCHes made so far, and objects held (for tests and benchmarks)."""
        with self._lock:
            reflectors = list(self._reflectors.values())
        return {"lists": sum(r.lists for r in reflectors), "watches": sum(r.watches for r in reflectors),
                "objects": sum(len(r) for r in reflectors)}

    def close(self) -> None:
        with self._lock:
            reflectors, sources = list(self._reflectors.values()), list(self._sources)
            self._reflectors, self._sources = {}, []
        for reflector in reflectors:
            reflector.stop()
        for source in sources:
            closer = getattr(source, "close", None)
            if closer is not None:
                closer()
