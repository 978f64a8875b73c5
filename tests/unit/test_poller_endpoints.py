"""Credentials from Secrets → broker endpoints, including special characters."""
from __future__ import annotations

import pytest

from emailqueue_operator import kube
from emailqueue_operator.poller import amqp_endpoint, management_endpoint
from emailqueue_operator.spec import parse_spec


class Secrets:
    """A stand-in for kube.SecretCache holding Secrets in memory."""

    def __init__(self, secrets):
        self.secrets = secrets

    def read(self, namespace, name):
        if name not in self.secrets:
            raise kube.SecretError(f"Secret {namespace}/{name} not found")
        return self.secrets[name]


def _spec(amqp_ref, **broker):
    return parse_spec({"scaleTargetRef": {"name": "w"},
                       "broker": {"queue": "q", "amqpSecretRef": amqp_ref, **broker}})


def test_separate_keys_keep_special_characters_verbatim():
    # No URI escaping needed: the password goes to the broker exactly as stored.
    secrets = Secrets({"rmq": {"host": "rabbit.mail.svc", "port": "5673", "user": "mailer",
                               "pass": "p@ss:w/rd%#?"}})
    spec = _spec({"name": "rmq", "hostKey": "host", "portKey": "port", "usernameKey": "user",
                  "passwordKey": "pass"}, vhost="mail")
    ep = amqp_endpoint(spec, "ns", secrets)
    assert (ep.host, ep.port, ep.vhost, ep.username, ep.password) == ("rabbit.mail.svc", 5673, "mail", "mailer",
                                                                      "p@ss:w/rd%#?")


def test_uri_key_and_vhost_from_spec_when_uri_has_none():
    secrets = Secrets({"rmq": {"uri": "amqp://u:p%40ss@rabbit:5672"}})
    ep = amqp_endpoint(_spec({"name": "rmq", "uriKey": "uri"}, vhost="mail"), "ns", secrets)
    assert (ep.vhost, ep.password) == ("mail", "p@ss")


def test_missing_key_names_the_key_but_no_value():
    secrets = Secrets({"rmq": {"uri-typo": "amqp://u:secret@rabbit/"}})
    with pytest.raises(kube.SecretError) as exc:
        amqp_endpoint(_spec({"name": "rmq", "uriKey": "uri"}), "ns", secrets)
    assert "'uri'" in str(exc.value) and "secret@" not in str(exc.value)
    assert exc.value.reason == "SecretKeyMissing"


def test_management_defaults_to_the_amqp_user():
    secrets = Secrets({"rmq": {"uri": "amqp://u:p@rabbit/"}, "mgmt": {"url": "http://rabbit:15672"}})
    spec = _spec({"name": "rmq", "uriKey": "uri"}, managementSecretRef={"name": "mgmt", "urlKey": "url"})
    amqp = amqp_endpoint(spec, "ns", secrets)
    mgmt = management_endpoint(spec, "ns", secrets, amqp)
    assert (mgmt.url, mgmt.username, mgmt.password) == ("http://rabbit:15672", "u", "p")
    assert "password" not in repr(mgmt)


@pytest.mark.parametrize(("uri", "spec_vhost", "expected"), [
    # spec.broker.vhost, when set, wins over the URI's vhost (KEDA's vhostName wins the same way)
    ("amqp://u:p@rabbit:5672/from-uri", "mail", "mail"),
    ("amqp://u:p@rabbit:5672/from-uri", "/", "/"),
    # unset: the URI's vhost, else /
    ("amqp://u:p@rabbit:5672/from-uri", None, "from-uri"),
    ("amqp://u:p@rabbit:5672/emails%2Fprod", None, "emails/prod"),
    ("amqp://u:p@rabbit:5672/", None, "/"),
    ("amqp://u:p@rabbit:5672", None, "/"),
])
def test_spec_vhost_wins_over_the_uri(uri, spec_vhost, expected):
    secrets = Secrets({"rmq": {"uri": uri}})
    broker = {} if spec_vhost is None else {"vhost": spec_vhost}
    ep = amqp_endpoint(_spec({"name": "rmq", "uriKey": "uri"}, **broker), "ns", secrets)
    assert ep.vhost == expected


def test_host_key_without_spec_vhost_is_the_root_vhost():
    secrets = Secrets({"rmq": {"host": "rabbit", "user": "u", "pass": "p"}})
    ep = amqp_endpoint(_spec({"name": "rmq", "hostKey": "host", "usernameKey": "user", "passwordKey": "pass"}),
                       "ns", secrets)
    assert ep.vhost == "/"
