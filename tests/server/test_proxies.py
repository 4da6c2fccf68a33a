"""server.proxies: the peer, or the client a trusted proxy speaks for."""

from __future__ import annotations

import pytest

from server.proxies import client_address, from_trusted_proxy, trusted_networks
from tests.conftest import make_settings


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path, trusted_proxies="127.0.0.1, ::1, 10.0.0.0/8")


def scope(peer: str | None, *forwarded: str) -> dict:
    return {
        "type": "http",
        "client": (peer, 51000) if peer is not None else None,
        "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded],
    }


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("10.20.30.40", True),  # inside 10.0.0.0/8
        ("::ffff:10.1.2.3", True),  # IPv4 through a dual-stack socket
        ("11.0.0.1", False),
        ("203.0.113.9", False),
        ("2001:db8::1", False),
        ("testclient", False),  # not an address at all
        (None, False),
    ],
)
def test_from_trusted_proxy_matches_addresses_and_networks(settings, peer, trusted):
    assert from_trusted_proxy(scope(peer), settings) is trusted


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # an untrusted peer: its X-Forwarded-For is whatever it likes, never read
        ("203.0.113.9", ["6.6.6.6"], "203.0.113.9"),
        # a trusted proxy: the right-most entry it did not itself vouch for
        ("127.0.0.1", ["198.51.100.7"], "198.51.100.7"),
        ("127.0.0.1", ["6.6.6.6, 198.51.100.7"], "198.51.100.7"),  # 6.6.6.6 is the client's own claim
        ("127.0.0.1", ["6.6.6.6, 198.51.100.7, 10.0.0.5"], "198.51.100.7"),  # through two trusted hops
        ("127.0.0.1", ["6.6.6.6", "198.51.100.7"], "198.51.100.7"),  # the header sent twice
        ("127.0.0.1", ["198.51.100.7:4711"], "198.51.100.7"),  # with a port
        ("127.0.0.1", ["[2001:db8::7]:443"], "2001:db8::7"),
        ("::1", ["2001:db8::7"], "2001:db8::7"),
        ("127.0.0.1", ["10.0.0.9, 10.0.0.5"], "10.0.0.9"),  # nothing but proxies: the left-most
        ("127.0.0.1", [], "127.0.0.1"),  # a local client with no proxy in front
        (None, ["198.51.100.7"], None),
    ],
)
def test_client_address(settings, peer, forwarded, client):
    assert client_address(scope(peer, *forwarded), settings) == client


def test_nothing_is_trusted_when_the_list_is_empty(tmp_path):
    settings = make_settings(tmp_path, trusted_proxies="")
    assert not from_trusted_proxy(scope("127.0.0.1"), settings)
    assert client_address(scope("127.0.0.1", "198.51.100.7"), settings) == "127.0.0.1"


def test_a_bad_entry_names_the_setting(tmp_path):
    with pytest.raises(ValueError, match="TUNELOOP_TRUSTED_PROXIES: 'proxy.local'"):
        trusted_networks(make_settings(tmp_path, trusted_proxies="127.0.0.1,proxy.local"))
