"""The REST API's OpenAPI 3.1 description: answer models, one decorator per route, /docs offline.

quart-schema builds `/openapi.json` from the pydantic models that already validate the request
bodies (`schemas.py`) and from the answer models here; the routes keep their own validation,
so these decorators describe and never change what a route does. `/docs` is Swagger UI, served
from `static/vendor/swagger-ui`, so it works with no internet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from quart import Quart
from quart_schema import HttpSecurityScheme, Info, OpenAPIProvider, QuartSchema, document
from werkzeug.routing import BaseConverter, Rule

from ..names import ROOM_PATTERN, USER_ID_PATTERN

F = TypeVar("F", bound=Callable[..., Any])


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable: unauthorized, malformed_json, invalid_fields, bus_unavailable…")
    message: str = Field(description="what went wrong and what to do, for a human")


class ErrorOut(BaseModel):
    """Every error the API answers, whatever its status."""

    error: ErrorDetail


class TokenOut(BaseModel):
    token: str = Field(description="pass it as the Socket.IO handshake's auth: {token}")
    expires_at: str = Field(description="UTC, ISO 8601")


class AcceptedOut(BaseModel):
    """The bus took the event: every instance holding a recipient delivers it."""

    accepted: Literal[True]
    id: str = Field(description="the event's id; Socket.IO clients that recover see it as their offset")
    scope: Literal["all", "authenticated", "user", "room"]


class ManyAcceptedOut(BaseModel):
    """The bus took every event of the call: one id per event, in order."""

    accepted: Literal[True]
    ids: list[str]
    scope: Literal["batch", "user"]


class UserOpOut(BaseModel):
    accepted: Literal[True]
    id: str
    user_id: str


class RevokedOut(UserOpOut):
    not_before: str = Field(description="tokens of this user minted before this instant (UTC) are refused")


class UserRoomsOut(BaseModel):
    user_id: str
    rooms: list[str]


class MembershipOut(BaseModel):
    user_id: str
    room: str
    member: bool
    changed: bool = Field(description="false when the user was already (or already not) a member")


class PresenceOut(BaseModel):
    user_id: str
    online: bool
    sockets: int = Field(ge=0)
    instances: list[str] = Field(description="the instances holding the user's sockets")
    since: str | None = Field(description="when the user came online (UTC), or null")


class PresencesOut(BaseModel):
    users: list[PresenceOut]


class RoomMember(BaseModel):
    user_id: str
    sockets: int = Field(ge=0)


class RoomPresenceOut(BaseModel):
    room: str
    members: list[RoomMember]
    next: str | None = Field(description="pass as ?after= for the next page; null on the last page")


class RoomPresenceQuery(BaseModel):
    model_config = ConfigDict(extra="allow")  # other query parameters (cache busters) are ignored

    limit: int | None = Field(default=None, ge=1, le=1000)
    # Empty, like absent, starts at the first member.
    after: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.@-]{0,128}$", description="`next` of the previous page")


class StatusOut(BaseModel):
    """This instance's details; the fields besides these follow the code and are not a contract."""

    model_config = ConfigDict(extra="allow")

    ready: bool
    instance: str


class HealthOut(BaseModel):
    status: Literal["ok"]
    instance: str


class BusState(BaseModel):
    kind: str
    connected: bool
    unreachable_shards: list[str] | None = Field(
        default=None, description="on a Redis Cluster, the masters (host:port) that do not answer; absent when none"
    )


class ReadyOut(BaseModel):
    ready: bool
    bus: BusState


# The errors a route can answer besides its own success, by what the route does.
AUTH = (401,)  # every /api route: the key is checked before anything else
BODY = (400, 413, 422)  # a JSON body: not JSON, too large, wrong fields
PATH = (422,)  # a user id or room name in the path
BUS = (503,)  # the bus must confirm


_MEANINGS = {
    400: "malformed_json: the body is not valid JSON",
    401: "unauthorized: no API key, or not one of API_KEYS",
    413: "payload_too_large: the body is over MAX_PAYLOAD_BYTES",
    422: "invalid_fields: a field, path parameter or query parameter breaks the contract; the message names it",
    503: "bus_unavailable: the event bus did not confirm; retry after Retry-After seconds",
}


def documented(
    ok: tuple[int, type[BaseModel]],
    *,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    errors: Iterable[int] = (),
    also: dict[int, type[BaseModel]] | None = None,
) -> Callable[[F], F]:
    """Describe a route: its success answer, its body and query models, its error statuses
    (each answered in the one error shape, `ErrorOut`) and `also` other answers."""
    responses: dict[int, Any] = {ok[0]: (ok[1], None)}  # quart-schema types its models as instances
    for status in sorted(set(errors)):
        responses[status] = (ErrorOut, None)
    for status, model in (also or {}).items():
        responses[status] = (model, None)
    described: Callable[[F], F] = document(request=body, querystring=query, responses=responses)
    return described


class Provider(OpenAPIProvider):
    """quart-schema's provider for the API's routes only (the REST hooks and the probes; not the
    demo's pages and forms, nor /metrics, which is Prometheus text), with the contract's
    patterns on user id and room path parameters."""

    _PATTERNS: ClassVar[dict[str, str]] = {"user_id": USER_ID_PATTERN, "room": ROOM_PATTERN}
    _DESCRIBED = ("/api/", "/healthz", "/readyz")

    def generate_rules(self) -> Iterable[Rule]:
        return (rule for rule in super().generate_rules() if rule.rule.startswith(self._DESCRIBED))

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        for operations in paths.values():
            for operation in operations.values():
                if "requestBody" in operation:
                    operation["requestBody"]["required"] = True  # an empty body is a 400
                for status, response in operation["responses"].items():
                    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                    if schema.get("title") == ErrorOut.__name__ and int(status) in _MEANINGS:
                        response["description"] = _MEANINGS[int(status)]
        return paths, components

    def build_path_parameter(self, name: str, converter: BaseConverter) -> dict[str, Any]:
        parameter = super().build_path_parameter(name, converter)
        if name in self._PATTERNS:
            parameter["schema"]["pattern"] = self._PATTERNS[name]
        return parameter


def init_app(app: Quart) -> QuartSchema:
    """Serve /openapi.json and /docs (Swagger UI from our static files; no other UI)."""
    app.config.update(
        QUART_SCHEMA_SWAGGER_JS_URL="/static/vendor/swagger-ui/swagger-ui-bundle.js",
        QUART_SCHEMA_SWAGGER_CSS_URL="/static/vendor/swagger-ui/swagger-ui.css",
    )
    schema = QuartSchema(
        info=Info(
            title="webapp REST API",
            version="1",
            description="Mint socket tokens and send events to sockets on every instance of the fleet. "
            "Every /api call needs `Authorization: Bearer <one of API_KEYS>`; every error is "
            '`{"error": {"code", "message"}}`.',
        ),
        openapi_provider_class=Provider,
        swagger_ui_path="/docs",
        redoc_ui_path=None,
        scalar_ui_path=None,
        security_schemes={"apiKey": HttpSecurityScheme(scheme="bearer")},
    )
    schema.init_app(app)
    return schema
