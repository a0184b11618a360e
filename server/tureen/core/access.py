"""Who may call what: bearer tokens, and the peers that admin calls are served to.

Admin calls change what every client gets, so they are closed unless the operator opened them:
with an admin token, the token decides; without one, only peers in ``--admin-allow-from``
(loopback by default, so a ``tureen push`` on the same machine or through ``kubectl
port-forward`` works) are served, unless ``--insecure-open-admin`` says otherwise. Transports
find the peer's address and the bearer token in their own protocol and ask ``Access.admit``.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tureen.errors import PermissionDenied, SoupError, Unauthenticated

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Kind = Literal["admin", "inference"]
LOOPBACK = ("127.0.0.0/8", "::1/128")


def networks(cidrs: Sequence[str], flag: str = "--admin-allow-from") -> tuple[Network, ...]:
    """Parse CIDRs (a bare address is a /32 or /128); a bad one is an error naming ``flag``."""
    parsed = []
    for cidr in cidrs:
        try:
            parsed.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError as exc:
            raise SoupError(f"{flag}: {cidr!r} is not an address or CIDR block: {exc}") from None
    return tuple(parsed)


@dataclass(frozen=True)
class Access:
    """The operator's access flags; ``admit`` raises for a call they do not allow."""

    admin_token: str | None = None
    inference_token: str | None = None
    admin_from: tuple[Network, ...] | None = None
    """Peers admin calls are served to; None: loopback, and only when there is no admin token."""
    open_admin: bool = False
    """``--insecure-open-admin``: without a token, admin calls are served to every peer."""

    @property
    def admin_open_to_all(self) -> bool:
        return self.admin_token is None and self.open_admin

    def open_to_all(self, kind: Kind) -> bool:
        """Whether every call of ``kind`` is admitted, so transports need not look at it at all
        (inference without a token: the request path pays nothing for access)."""
        if kind == "inference":
            return self.inference_token is None
        return self.admin_open_to_all and self.admin_from is None

    def admit(self, kind: Kind, bearer: str | None, peer: str | None) -> None:
        """Allow a call of ``kind`` carrying ``bearer`` (None: no authorization header) from
        ``peer`` (an IP address; None when the transport has none), or raise why not."""
        token = self.admin_token if kind == "admin" else self.inference_token
        if token is not None:
            _check_token(kind, token, bearer)
        if kind == "inference":
            return
        if self.admin_from is None and (token is not None or self.open_admin):
            return
        allowed = self.admin_from if self.admin_from is not None else _LOOPBACK
        if _within(peer, allowed):
            return
        blocks = ", ".join(str(net) for net in allowed)
        who = f"from {peer}" if peer else "from a peer without an IP address"
        if token is not None:
            raise PermissionDenied(
                f"admin calls {who} are refused: this server takes them only from {blocks} (--admin-allow-from)"
            )
        raise PermissionDenied(
            f"admin calls {who} are refused: with no admin token, this server takes admin and repository calls "
            f"only from {blocks} (--admin-allow-from); start it with --admin-token-file F to take them from token holders"
        )


def bearer_of(authorization: str | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header value; "" for another scheme;
    None without the header."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


def _check_token(kind: Kind, token: str, bearer: str | None) -> None:
    if bearer is None:
        raise Unauthenticated(f"{kind} calls need 'authorization: Bearer <token>' metadata")
    if not hmac.compare_digest(bearer.encode(), token.encode()):
        raise Unauthenticated(f"the bearer token is not valid for {kind} calls")


def _within(peer: str | None, allowed: tuple[Network, ...]) -> bool:
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # an IPv4 client of a dual-stack listener
    return any(address.version == net.version and address in net for net in allowed)


_LOOPBACK = networks(LOOPBACK)
