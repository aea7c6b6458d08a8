"""Plain HTTP requests for what an SDK would not send (bad JSON, wrong paths): stdlib only."""

from __future__ import annotations

import http.client
import json as jsonlib
from urllib.parse import urlsplit


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.content = body

    def json(self):
        return jsonlib.loads(self.content)


def request(base_url: str, method: str, path: str, *, json=None, content: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 30) -> RawResponse:
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    hdrs = dict(headers or {})
    if json is not None:
        content = jsonlib.dumps(json).encode()
        hdrs.setdefault("content-type", "application/json")
    try:
        conn.request(method, path, body=content, headers=hdrs)
        resp = conn.getresponse()
        return RawResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()
