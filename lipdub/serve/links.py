"""Short-lived signed links to a job's result, for `<video src>` and download links.

A browser cannot put an ``Authorization`` header on a ``<video>`` element or a link, and a
token in a URL ends up in logs and history. So an authorized client asks for a link
(``POST /api/jobs/{id}/link``) and gets ``/api/jobs/{id}/result?expires=T&sig=S``: S is an
HMAC-SHA256 of the job id and the expiry time T under a secret that only this server process
holds (made at start-up, never stored: a restart ends every link). A link opens that one
job's result, with GET or HEAD, until T; nothing else.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from urllib.parse import parse_qs

DEFAULT_TTL_S = 900  # 15 minutes: a page asks again when a link has run out
MAX_TTL_S = 3600


class LinkSigner:
    def __init__(self, secret: bytes | None = None, clock=time.time) -> None:
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._clock = clock

    def _sig(self, job_id: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"result\n{job_id}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def link(self, job_id: str, ttl_s: float = DEFAULT_TTL_S) -> tuple[str, int]:
        """(URL of the result of `job_id`, valid until; Unix seconds)."""
        expires = int(self._clock() + max(1.0, min(float(ttl_s), MAX_TTL_S)))
        return f"/api/jobs/{job_id}/result?expires={expires}&sig={self._sig(job_id, expires)}", expires

    def allows(self, job_id: str, query_string: bytes) -> bool:
        """Whether the query of a request for the result of `job_id` carries a valid, unexpired signature."""
        query = parse_qs(query_string.decode("latin-1"))
        expires, sig = query.get("expires", [""])[0], query.get("sig", [""])[0]
        if not expires.isdigit() or len(expires) > 12 or not sig:
            return False
        if int(expires) < self._clock():
            return False
        return hmac.compare_digest(sig.encode("latin-1"), self._sig(job_id, int(expires)).encode())
