"""Kubernetes I/O: the scale target's `/scale`, Secrets, and EmailQueue status.

The only module that reads or patches the worker Deployment/StatefulSet. Errors are
translated to `TargetError` / `SecretError` with messages fit for a condition.
"""
from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

GROUP, VERSION, PLURAL = "emailqueue.dev", "v1alpha1", "emailqueues"


class TargetError(Exception):
    reason = "TargetNotFound"


class SecretError(Exception):
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


def _apps() -> client.AppsV1Api:
    return client.AppsV1Api(api_client())


def read_target(namespace: str, kind: str, name: str) -> TargetScale:
    apps = _apps()
    try:
        if kind == "Deployment":
            obj = apps.read_namespaced_deployment(name, namespace, _request_timeout=10)
        elif kind == "StatefulSet":
            obj = apps.read_namespaced_stateful_set(name, namespace, _request_timeout=10)
        else:
            err = TargetError(f"scaleTargetRef.kind {kind!r} is not supported (Deployment or StatefulSet)")
            err.reason = "TargetKindUnsupported"
            raise err
    except ApiException as exc:
        if exc.status == 404:
            raise TargetError(f"{kind} {namespace}/{name} not found") from None
        err = TargetError(f"reading {kind} {namespace}/{name} failed: HTTP {exc.status} {exc.reason}")
        err.reason = "TargetUnreadable"
        raise err from None
    status = obj.status
    selector = None
    if obj.spec.selector and obj.spec.selector.match_labels:
        selector = ",".join(f"{k}={v}" for k, v in sorted(obj.spec.selector.match_labels.items()))
    return TargetScale(kind=kind, name=name, replicas=int(obj.spec.replicas if obj.spec.replicas is not None else 1),
                       ready_replicas=int((status.ready_replicas if status else 0) or 0), selector=selector)


def scale_target(namespace: str, kind: str, name: str, replicas: int) -> None:
    """Patch the target's /scale subresource (the only write the operator makes to it)."""
    apps = _apps()
    body = {"spec": {"replicas": int(replicas)}}
    try:
        if kind == "Deployment":
            apps.patch_namespaced_deployment_scale(name, namespace, body, _request_timeout=10)
        else:
            apps.patch_namespaced_stateful_set_scale(name, namespace, body, _request_timeout=10)
    except ApiException as exc:
        err = TargetError(f"scaling {kind} {namespace}/{name} to {replicas} failed: HTTP {exc.status} {exc.reason}")
        err.reason = "ScaleFailed"
        raise err from None


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
            err = SecretError(f"reading Secret {namespace}/{name} failed: HTTP {exc.status} {exc.reason}")
            err.reason = "SecretUnreadable"
            raise err from None
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
        err = SecretError(f"Secret {namespace}/{name} has no key {key!r}")
        err.reason = "SecretKeyMissing"
        raise err
    return data[key]


def patch_status(namespace: str, name: str, status: Mapping[str, Any]) -> None:
    """Merge-patch the EmailQueue's status subresource."""
    api = client.CustomObjectsApi(api_client())
    try:
        api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)},
                                                  _request_timeout=10)
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
