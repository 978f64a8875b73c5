"""Kubernetes I/O: the scale target's `/scale`, Secrets, and EmailQueue status.

The only module that reads or patches the worker Deployment/StatefulSet. Errors are
translated to `TargetError` / `SecretError` with messages fit for a condition.
"""
from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

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


@dataclass(frozen=True)
class TargetScale:
    """What the target looks like now: desired replicas (/scale) and how many are ready."""

    kind: str
    name: str
    replicas: int
    ready_replicas: int
    selector: str | None


_api_lock = threading.Lock()
_api: client.ApiClient | None = None


def api_client() -> client.ApiClient:
    """One ApiClient for the process (in-cluster config, else the kubeconfig)."""
    global _api
    with _api_lock:
        if _api is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            _api = client.ApiClient()
        return _api


def _drain(resp: Any) -> bytes:
    """Read a raw (`_preload_content=False`) response and give its connection back to the
    pool; an unreleased one makes the next request open a new TLS connection."""
    try:
        return resp.data
    finally:
        resp.release_conn()


def _apps() -> client.AppsV1Api:
    return client.AppsV1Api(api_client())


def _check_kind(kind: str) -> None:
    if kind not in ("Deployment", "StatefulSet"):
        raise TargetError(f"scaleTargetRef.kind {kind!r} is not supported (Deployment or StatefulSet)",
                          "TargetKindUnsupported")


def _target_from(kind: str, name: str, obj: Mapping[str, Any]) -> TargetScale:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or None
    replicas = spec.get("replicas")
    return TargetScale(kind=kind, name=name, replicas=int(1 if replicas is None else replicas),
                       ready_replicas=int(status.get("readyReplicas") or 0), selector=selector)


class TargetCache:
    """Targets read by listing their namespace at most every `ttl` seconds.

    A thousand EmailQueues in a namespace then cost one LIST per interval instead of a
    thousand GETs (the dominant CPU cost of a poll). Raw JSON is parsed with the C json
    module: the client's model deserialisation costs more than the rest of a poll.
    A target missing from the listing is confirmed with a GET before it is reported.
    """

    def __init__(self, ttl: float = 2.0) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._fetch_locks: dict[tuple[str, str], threading.Lock] = {}
        self._lists: dict[tuple[str, str], tuple[float, dict[str, TargetScale]]] = {}
        self.lists = 0

    def _list(self, namespace: str, kind: str) -> dict[str, TargetScale]:
        apps = _apps()
        if kind == "Deployment":
            resp = apps.list_namespaced_deployment(namespace, _request_timeout=30, _preload_content=False)
        else:
            resp = apps.list_namespaced_stateful_set(namespace, _request_timeout=30, _preload_content=False)
        self.lists += 1
        items = json.loads(_drain(resp)).get("items") or []
        return {item["metadata"]["name"]: _target_from(kind, item["metadata"]["name"], item) for item in items}

    def read(self, namespace: str, kind: str, name: str) -> TargetScale:
        _check_kind(kind)
        key = (namespace, kind)
        with self._lock:
            fetch_lock = self._fetch_locks.setdefault(key, threading.Lock())
        with fetch_lock:
            cached = self._lists.get(key)
            if cached is None or time.monotonic() - cached[0] >= self.ttl:
                try:
                    cached = (time.monotonic(), self._list(namespace, kind))
                except ApiException as exc:
                    if exc.status == 403:  # no list permission: fall back to one GET per target
                        return read_target(namespace, kind, name)
                    raise TargetError(f"listing {kind}s in {namespace} failed: HTTP {exc.status} {exc.reason}",
                                      "TargetUnreadable") from None
                self._lists[key] = cached
        target = cached[1].get(name)
        return target if target is not None else read_target(namespace, kind, name)

    def forget(self, namespace: str, kind: str) -> None:
        with self._lock:
            self._lists.pop((namespace, kind), None)


def read_target(namespace: str, kind: str, name: str) -> TargetScale:
    """One target by GET (raw JSON, see TargetCache)."""
    _check_kind(kind)
    apps = _apps()
    try:
        if kind == "Deployment":
            resp = apps.read_namespaced_deployment(name, namespace, _request_timeout=10, _preload_content=False)
        else:
            resp = apps.read_namespaced_stateful_set(name, namespace, _request_timeout=10, _preload_content=False)
        obj = json.loads(_drain(resp))
    except ApiException as exc:
        if exc.status == 404:
            raise TargetError(f"{kind} {namespace}/{name} not found") from None
        raise TargetError(f"reading {kind} {namespace}/{name} failed: HTTP {exc.status} {exc.reason}",
                          "TargetUnreadable") from None
    return _target_from(kind, name, obj)


def scale_target(namespace: str, kind: str, name: str, replicas: int) -> None:
    """Patch the target's /scale subresource (the only write the operator makes to it)."""
    apps = _apps()
    body = {"spec": {"replicas": int(replicas)}}
    try:
        if kind == "Deployment":
            _drain(apps.patch_namespaced_deployment_scale(name, namespace, body, _request_timeout=10,
                                                          _preload_content=False))
        else:
            _drain(apps.patch_namespaced_stateful_set_scale(name, namespace, body, _request_timeout=10,
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
        _drain(api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name,
                                                         {"status": dict(status)}, _request_timeout=10,
                                                         _preload_content=False))
    except ApiException as exc:
        if exc.status == 404:
            return  # deleted meanwhile: nothing to report on
        raise


_hpa_cache: dict[str, tuple[float, list[tuple[str, str, str]]]] = {}
_hpa_lock = threading.Lock()
HPA_CACHE_SECONDS = 15.0


def conflicting_hpas(namespace: str, kind: str, name: str) -> list[str]:
    """HorizontalPodAutoscalers in the namespace that also scale the target (listed at most every 15 s)."""
    with _hpa_lock:
        cached = _hpa_cache.get(namespace)
    if cached is None or time.monotonic() - cached[0] > HPA_CACHE_SECONDS:
        try:
            items = client.AutoscalingV2Api(api_client()).list_namespaced_horizontal_pod_autoscaler(
                namespace, _request_timeout=10).items
        except ApiException:
            items = []  # unreadable HPAs (RBAC) must not stop scaling
        refs = [(h.metadata.name, h.spec.scale_target_ref.kind, h.spec.scale_target_ref.name) for h in items]
        with _hpa_lock:
            _hpa_cache[namespace] = cached = (time.monotonic(), refs)
    return [hpa for hpa, hpa_kind, hpa_target in cached[1] if hpa_kind == kind and hpa_target == name]
