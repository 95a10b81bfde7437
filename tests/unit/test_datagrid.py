"""The Datagrid client builds its requests itself (``DatagridClient._request``): they must be the
requests the httpx client's own ``build_request`` gives, cookies included once a server set some."""

from __future__ import annotations

import httpx

from forwarder.config import SecretStr, Settings
from forwarder.datagrid import DatagridClient
from forwarder.observability import Metrics


def _client(transport: httpx.AsyncBaseTransport | None = None) -> DatagridClient:
    settings = Settings(
        datagrid_api_key=SecretStr("k-123"),
        datagrid_base_url="https://datagrid.example/v1",
        datagrid_teamspace="team-a",
    )
    return DatagridClient(settings, Metrics(process=False), transport=transport)


def _same(ours: httpx.Request, theirs: httpx.Request) -> None:
    assert (ours.method, ours.url) == (theirs.method, theirs.url)
    assert ours.headers.multi_items() == theirs.headers.multi_items()
    assert ours.extensions == theirs.extensions


async def test_requests_are_what_build_request_gives() -> None:
    client = _client()
    http = client._http
    for path, accept, params in (
        ("batch-predictions/bpred_1", "application/json", None),
        ("batch-predictions/bpred_1/results", "application/x-ndjson", None),
        ("batch-predictions", "application/json", {"limit": 100, "after": "bpred_0"}),
    ):
        ours = client._request(path, accept, params)
        headers = {"Accept": accept, "Accept-Encoding": "identity"}
        _same(ours, http.build_request("GET", path, headers=headers, params=params))
        assert ours.headers["authorization"] == "Bearer k-123"
        assert ours.headers["datagrid-teamspace"] == "team-a"
    await client.aclose()


async def test_cookies_a_server_set_are_sent_back() -> None:
    """A load balancer's stickiness cookie goes back on the next request, as httpx would."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": "bpred_1"}, headers={"Set-Cookie": "lb=node-2"})

    client = _client(httpx.MockTransport(handler))
    assert (
        client._request("batch-predictions/bpred_1", "application/json", None).headers.get("cookie")
        is None
    )
    await client.get_batch("bpred_1")
    again = client._request("batch-predictions/bpred_1", "application/json", None)
    assert again.headers["cookie"] == "lb=node-2"
    await client.aclose()
