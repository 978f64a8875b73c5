"""The operator starts as a uid with no passwd entry (the image's 65532): kopf is handed an
identity, because its default (getpass.getuser()) raises KeyError there. Found when the chart
first ran as real pods (issue 13)."""
from __future__ import annotations

import asyncio
import getpass
from typing import Any

import pytest

from emailqueue_operator import runner


@pytest.mark.parametrize("pod_name", ["emailqueue-operator-5d9c-abcde", None])
def test_kopf_gets_an_identity_without_a_passwd_entry(monkeypatch, pod_name):
    def no_user() -> str:
        raise KeyError("getpwuid(): uid not found: 65532")

    monkeypatch.setattr(getpass, "getuser", no_user)
    if pod_name:
        monkeypatch.setenv("POD_NAME", pod_name)
    else:
        monkeypatch.delenv("POD_NAME", raising=False)
    seen: dict[str, Any] = {}

    async def fake_operator(**kwargs: Any) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(runner.kopf, "operator", fake_operator)
    asyncio.run(runner._operate([], None, None))
    assert seen["identity"]
    if pod_name:
        assert seen["identity"].startswith(pod_name)
