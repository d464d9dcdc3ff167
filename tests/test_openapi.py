"""The REST API against its own OpenAPI document: described completely, and fuzzed with schemathesis
against a real instance on a real Redis."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.generation.modes import GenerationMode

from webapp import Settings, create_app

from .harness import API_KEY, SECRET_KEY, Instance, http_get, instance_env, unique

pytestmark = pytest.mark.cluster

EXAMPLES = 30  # per operation and generation mode: about 1,000 requests, 10 s here
# The same examples on every run, so CI is repeatable; FUZZ_RANDOM=1 explores new ones.
DERANDOMIZE = not os.environ.get("FUZZ_RANDOM")


@pytest.fixture(scope="module")
def served() -> Iterator[Instance]:
    instance = Instance("F", instance_env(unique("fuzz"))).start()
    try:
        instance.wait_serving()
        yield instance
    finally:
        instance.stop()


def _document() -> dict[str, Any]:
    """The document the app serves at /openapi.json (the first test checks the two agree), built
    at collection time: schemathesis's fixture-based loading breaks on pytest 9."""
    app = create_app(Settings(api_keys=(API_KEY,), secret_key=SECRET_KEY, secret_keys=(SECRET_KEY,)))
    built = app.extensions["QUART_SCHEMA"].openapi_provider.schema()
    return dict(json.loads(app.json.dumps(built)))  # as served: string status codes, plain dicts


def test_the_document_describes_every_route_and_every_answer(served: Instance) -> None:
    status, document = http_get(served.url + "/openapi.json")
    assert status == 200
    assert document == _document()  # what the fuzzing below is generated from
    assert document["openapi"] == "3.1.0"
    operations = {
        (method.upper(), path): operation
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    }
    assert {
        ("POST", "/api/tokens"), ("POST", "/api/emit/all"), ("POST", "/api/emit/authenticated"),
        ("POST", "/api/emit/users/{user_id}"), ("POST", "/api/emit/rooms/{room}"), ("POST", "/api/emit/batch"),
        ("POST", "/api/emit/users"), ("GET", "/api/users/{user_id}/rooms"), ("PUT", "/api/users/{user_id}/rooms/{room}"),
        ("DELETE", "/api/users/{user_id}/rooms/{room}"), ("POST", "/api/users/{user_id}/disconnect"),
        ("POST", "/api/users/{user_id}/revoke"), ("GET", "/api/users/{user_id}/presence"), ("POST", "/api/presence"),
        ("GET", "/api/rooms/{room}/presence"), ("GET", "/api/status"), ("GET", "/healthz"), ("GET", "/readyz"),
    } == set(operations)
    error_ref = {"$ref": "#/components/schemas/ErrorOut"}
    for (method, path), operation in operations.items():
        assert operation["summary"], (method, path)
        answers = operation["responses"]
        if path.startswith("/api/"):
            assert operation["security"] == [{"apiKey": []}]
            assert "401" in answers
        if "requestBody" in operation:
            assert {"400", "413", "422"} <= set(answers), (method, path)
        for code, answer in answers.items():
            schema = answer["content"]["application/json"]["schema"]
            if int(code) >= 400 and path != "/readyz":
                assert schema.get("title") == "ErrorOut" or schema == error_ref, (method, path, code)
    # The docs page needs nothing from the internet: its script and style are ours.
    page = _text(served.url + "/docs")
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in page and "https://" not in page
    assert _text(served.url + "/static/vendor/swagger-ui/swagger-ui-bundle.js").startswith("/*")


def _text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every error keeps the contract's shape: {"error": {"code": str, "message": str}}."""
    if response.status_code < 400 or case.path == "/readyz":
        return None
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"].get("code"), str) and isinstance(body["error"].get("message"), str), body
    return True


schema = schemathesis.openapi.from_dict(_document())
# The API key is ours to send (below), not a parameter to fuzz: without it every call is a 401.
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], with_security_parameters=False)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=DERANDOMIZE, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_no_5xx_and_answers_that_match_the_document(case: Any, served: Instance) -> None:
    """Valid and invalid requests to every operation: no 5xx, every answer matches the document
    (status, content type, body), invalid data is refused, and errors keep their shape."""
    case.call_and_validate(
        base_url=served.url, headers={"Authorization": f"Bearer {API_KEY}"}, additional_checks=[error_shape]
    )
