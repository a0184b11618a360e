"""TLS files, as the operator gives them (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``), for both ports."""

from __future__ import annotations

from dataclasses import dataclass

from tureen.errors import SoupError


@dataclass(frozen=True)
class Tls:
    """Certificate and key files; with a client CA, clients must present a certificate (mTLS)."""

    cert: str
    key: str
    client_ca: str | None = None


def read_file(path: str, flag: str) -> bytes:
    """A TLS file's bytes; an unreadable one fails start-up naming its flag."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise SoupError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
