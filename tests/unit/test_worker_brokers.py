"""A list of broker nodes in one AMQP_URL (client-side failover, issue #16)."""
from __future__ import annotations

import pytest

from email_worker.brokers import connection_parameters, display, rotated, split_urls

PAIR = "amqp://app:s3cret@rmq-0:5672/mail, amqp://app:s3cret@rmq-1:5672/mail"


@pytest.mark.parametrize(("text", "expected"), [
    # one URL, as before
    ("amqp://u:p@h:5672/v", ("amqp://u:p@h:5672/v",)),
    # commas, commas with spaces, whitespace and newlines (a multi-line Secret) all separate
    (PAIR, ("amqp://app:s3cret@rmq-0:5672/mail", "amqp://app:s3cret@rmq-1:5672/mail")),
    ("amqp://h0/v,amqp://h1/v", ("amqp://h0/v", "amqp://h1/v")),
    ("  amqp://h0/v\n  amqps://h1:5671/v\n", ("amqp://h0/v", "amqps://h1:5671/v")),
    # a comma inside a password is part of it (RFC 3986 allows it in userinfo)
    ("amqp://u:a,b@h0/v, amqp://u:a,b@h1/v", ("amqp://u:a,b@h0/v", "amqp://u:a,b@h1/v")),
    # a trailing comma is not a URL
    ("amqp://h0/v,", ("amqp://h0/v",)),
    # the scheme is case-insensitive
    ("AMQP://h0/v, AMQPS://h1/v", ("AMQP://h0/v", "AMQPS://h1/v")),
])
def test_split_urls(text: str, expected: tuple[str, ...]) -> None:
    assert split_urls(text) == expected


@pytest.mark.parametrize("text", ["", "  ,  ", "http://rmq-0:15672/", "rmq-0:5672"])
def test_no_amqp_url_is_an_error_without_the_password(text: str) -> None:
    with pytest.raises(ValueError):
        split_urls(text)
    with pytest.raises(ValueError) as caught:
        split_urls("amqp://u:hunter2@h0/v, redis://u:hunter2@h1")
    assert "hunter2" not in str(caught.value)


def test_each_client_starts_at_its_own_node_and_keeps_the_order() -> None:
    nodes = ("a", "b", "c")
    assert [rotated(nodes, start) for start in range(4)] == [
        ("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b"), ("a", "b", "c")]
    assert rotated((), 3) == ()


def test_parameters_for_every_node_configured_alike() -> None:
    def configure(params):  # type: ignore[no-untyped-def]
        params.heartbeat = 7

    params = connection_parameters(PAIR, start=1, configure=configure)
    assert [(p.host, p.virtual_host, p.heartbeat) for p in params] == [("rmq-1", "mail", 7), ("rmq-0", "mail", 7)]
    assert display(PAIR) == "amqp://app:***@rmq-0:5672/mail, amqp://app:***@rmq-1:5672/mail"


def test_a_malformed_url_names_itself_without_the_password() -> None:
    with pytest.raises(ValueError) as caught:
        connection_parameters("amqp://u:hunter2@h0:notaport/v")
    assert "hunter2" not in str(caught.value) and "invalid AMQP URL" in str(caught.value)
