"""web/listing.py: mitmweb lists a gateway flow by what the client called, at the gateway's address
(the browser test, tests/e2e/test_mitmweb_browser.py, looks at the rendered list)."""

from __future__ import annotations

from mitmproxy.test import tflow

from addon.web.listing import as_called, called_url


def flow(host: str, port: int, path: str, meta: dict | None = None):
    f = tflow.tflow(resp=True)
    f.request.host, f.request.port, f.request.path = host, port, path
    f.client_conn.sockname = ("127.0.0.1", 8080)
    f.client_conn.timestamp_tls_setup = None  # a plain-HTTP client
    if meta is not None:
        f.metadata["gateway"] = meta
    return f


def test_a_routed_flow_is_listed_by_the_path_the_client_called_not_the_providers_url():
    f = flow("api.anthropic.com", 443, "/v1/messages", {"key": "team-a", "client_path": "/v1/chat/completions?x=1"})
    assert as_called(f) == {"scheme": "http", "host": "127.0.0.1", "port": 8080, "path": "/v1/chat/completions?x=1",
                            "pretty_host": "127.0.0.1"}
    assert called_url(f) == "http://127.0.0.1:8080/v1/chat/completions?x=1"
    assert f.request.host == "api.anthropic.com"  # the flow itself is what went upstream


def test_what_the_gateway_answered_itself_is_listed_at_its_address_not_the_placeholder():
    assert called_url(flow("127.0.0.1", 1, "/health")) == "http://127.0.0.1:8080/health"
    tls = flow("127.0.0.1", 1, "/v1/models")
    tls.client_conn.timestamp_tls_setup, tls.client_conn.sockname = 1.0, ("::1", 443)
    assert called_url(tls) == "https://[::1]/v1/models"


def test_any_other_flow_is_listed_as_it_is():
    f = flow("example.com", 80, "/x")
    assert as_called(f) is None and called_url(f) == "http://example.com/x"
