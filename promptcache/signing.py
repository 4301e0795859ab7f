"""Signed image URLs: an expiry and an HMAC over the path and the expiry.

With `PROMPTCACHE_URL_SIGNING_KEY` set, every `image_url` / `thumbnail_url` a result carries ends
in `?exp=<unix seconds>&sig=<base64url HMAC-SHA256 of "<path>\\n<exp>">`, valid for
`PROMPTCACHE_URL_TTL`. The web process serves a file only for a signature that matches and has
not expired (compared in constant time). Rotation: the previous key
(`PROMPTCACHE_URL_SIGNING_KEY_PREVIOUS`) is still accepted until
`PROMPTCACHE_URL_SIGNING_PREVIOUS_UNTIL`; new URLs are always signed with the current key.
Pure, no I/O; the keys never leave this object (no repr, no logs).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from enum import Enum
from urllib.parse import urlencode


class Verdict(str, Enum):
    OK = "ok"
    MISSING = "signature_missing"
    EXPIRED = "signature_expired"
    INVALID = "signature_invalid"


def _mac(key: bytes, path: str, expires: int) -> str:
    digest = hmac.new(key, f"{path}\n{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class UrlSigner:
    def __init__(self, key: str, *, ttl_s: float, previous: str | None = None,
                 previous_until: float | None = None) -> None:
        if not key:
            raise ValueError("a signing key must not be empty")
        self._key = key.encode()
        self._previous = previous.encode() if previous else None
        self._previous_until = previous_until
        self.ttl_s = ttl_s

    def __repr__(self) -> str:  # never the keys
        return f"UrlSigner(ttl_s={self.ttl_s}, previous={self._previous is not None})"

    def query(self, path: str, *, now: float | None = None) -> str:
        """The query string (without "?") that signs `path` (e.g. `/images/<sha>.png`)."""
        expires = int((time.time() if now is None else now) + self.ttl_s)
        return urlencode({"exp": expires, "sig": _mac(self._key, path, expires)})

    def sign(self, url: str, path: str, *, now: float | None = None) -> str:
        return f"{url}?{self.query(path, now=now)}"

    def _keys(self, now: float) -> Sequence[bytes]:
        if self._previous is not None and (self._previous_until is None
                                           or now <= self._previous_until):
            return (self._key, self._previous)
        return (self._key,)

    def verify(self, path: str, exp: str | None, sig: str | None, *,
               now: float | None = None) -> Verdict:
        if not exp or not sig:
            return Verdict.MISSING
        try:
            expires = int(exp)
        except ValueError:
            return Verdict.INVALID
        now = time.time() if now is None else now
        given = sig.encode("utf-8", "surrogateescape")  # bytes: any input compares, never raises
        matched = False
        for key in self._keys(now):  # every key compared: no early exit on a match
            matched |= hmac.compare_digest(_mac(key, path, expires).encode(), given)
        if not matched:
            return Verdict.INVALID
        return Verdict.OK if expires >= now else Verdict.EXPIRED
