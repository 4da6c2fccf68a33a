"""Who is really on the other end: the TCP peer, or the client a trusted
reverse proxy speaks for.

``TUNELOOP_TRUSTED_PROXIES`` lists addresses and CIDR networks
(``127.0.0.1,::1,10.0.0.0/8``). Headers a proxy sets (``X-Forwarded-For``,
the single sign-on user header) are believed only when the peer is one of
them: anyone else can write whatever they like there.

``X-Forwarded-For`` is read from the right: each proxy appends the address it
was connected from, so the right-most entry that is not itself a trusted proxy
is the first address nobody we trust could have forged::

    X-Forwarded-For: 6.6.6.6, 203.0.113.9, 10.0.0.5     (peer 127.0.0.1)
    trusted 127.0.0.1 and 10.0.0.0/8  ->  client 203.0.113.9
"""

from __future__ import annotations

import functools
import ipaddress

from starlette.types import Scope

from store.settings import Settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=16)
def _networks(text: str) -> tuple[Network, ...]:
    networks = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError as exc:
            raise ValueError(
                f"TUNELOOP_TRUSTED_PROXIES: {entry!r} is neither an address nor a network such as 10.0.0.0/8"
            ) from exc
    return tuple(networks)


def trusted_networks(settings: Settings) -> tuple[Network, ...]:
    """``settings.trusted_proxies`` parsed (once per distinct value); ValueError
    naming the setting when an entry is neither an address nor a network."""
    return _networks(settings.trusted_proxies)


def _address(text: str) -> Address | None:
    """An address as a peer or an ``X-Forwarded-For`` entry may write it (a port
    after it, IPv6 in brackets); None when it is not an address at all."""
    text = text.strip()
    if text.startswith("["):  # [2001:db8::1]:443
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # 203.0.113.9:443
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 from a dual-stack socket is 127.0.0.1
    return address


def _is_trusted(address: Address | None, networks: tuple[Network, ...]) -> bool:
    return address is not None and any(address in network for network in networks)


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def from_trusted_proxy(scope: Scope, settings: Settings) -> bool:
    """Whether the TCP peer of ``scope`` is one of ``TUNELOOP_TRUSTED_PROXIES``."""
    peer = _peer(scope)
    return peer is not None and _is_trusted(_address(peer), trusted_networks(settings))


def client_address(scope: Scope, settings: Settings) -> str | None:
    """The client's address: the TCP peer, or -- when the peer is a trusted
    proxy -- the right-most ``X-Forwarded-For`` entry that is not a trusted proxy
    itself (the left-most entry when all of them are). None when the server
    does not know the peer (some test transports)."""
    peer = _peer(scope)
    if peer is None:
        return None
    networks = trusted_networks(settings)
    if not _is_trusted(_address(peer), networks):
        return peer
    forwarded = [
        entry.strip()
        for name, value in scope.get("headers", ())
        if name == b"x-forwarded-for"
        for entry in value.decode("latin-1").split(",")
        if entry.strip()
    ]
    for entry in reversed(forwarded):
        address = _address(entry)
        if not _is_trusted(address, networks):
            return str(address) if address is not None else entry
    return str(_address(forwarded[0])) if forwarded else peer
