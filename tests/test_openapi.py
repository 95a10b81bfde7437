"""The OpenAPI document is complete and served offline."""

from __future__ import annotations

from typing import Any

from litestar.testing import TestClient

from forwarder.app import create_app
from forwarder.config import SecretStr, Settings


def _document() -> tuple[dict[str, Any], str]:
    settings = Settings(
        datagrid_api_key=SecretStr("dg_key"),
        webhook_secrets=[SecretStr("whsec_x")],
        api_tokens=[SecretStr("token_x")],
    )
    # Outside a `with` block the test client runs no lifespan: no Kafka is needed for the document.
    client = TestClient(app=create_app(settings))
    page = client.get("/schema")
    document = client.get("/schema/openapi.json")
    assert page.status_code == 200 and document.status_code == 200
    return document.json(), page.text


def test_schema_is_served_without_external_assets() -> None:
    """`/schema` is the document itself: no UI page pulling scripts from a CDN."""
    document, page = _document()
    assert page.lstrip().startswith("{") and "<script" not in page
    assert document["openapi"].startswith("3.")


def test_every_route_documents_its_body_auth_and_errors() -> None:
    """Request bodies, the bearer scheme, the signature header and problem+json errors."""
    document, _ = _document()
    paths = document["paths"]
    queue = paths["/v1/batches"]["post"]
    assert queue["requestBody"]["content"]["application/json"]["schema"]["required"] == ["batch_id"]
    assert queue["security"] == [{"bearer": []}]
    assert paths["/v1/batches/{batch_id}"]["get"]["security"] == [{"bearer": []}]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    hook = paths["/webhooks/datagrid"]["post"]
    assert "requestBody" in hook
    assert any(
        p["name"] == "Datagrid-Signature" and p["in"] == "header" for p in hook["parameters"]
    )
    for route, method, code in [
        ("/v1/batches", "post", "401"),
        ("/v1/batches", "post", "503"),
        ("/webhooks/datagrid", "post", "401"),
        ("/webhooks/datagrid", "post", "413"),
        ("/v1/batches/{batch_id}", "get", "404"),
    ]:
        response = paths[route][method]["responses"][code]
        assert "application/problem+json" in response["content"], (route, code)
