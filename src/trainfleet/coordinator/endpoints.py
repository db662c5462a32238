"""The HTTP route table: one declaration per endpoint gives auth, body validation, JSON errors
and the endpoint's OpenAPI entry, so the served API and its description cannot drift apart.

Handlers are ``async def handler(ctx) -> BaseModel | Response | None``; queue calls go through
``ctx.run`` (a thread pool), keeping the event loop free while SQLite works.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trainfleet.coordinator.auth import Auth, authenticate
from trainfleet.errors import ApiError, BadRequest

if TYPE_CHECKING:
    from trainfleet.coordinator.state import Coordinator

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_JSON_BYTES = 16 * 1024 * 1024

_AUTH_DOC = {
    "none": "none",
    "join": "join token (Authorization: Bearer JOIN_TOKEN)",
    "worker": "worker credential from /v1/workers/register",
    "operator": "operator token (Authorization: Bearer OPERATOR_TOKEN)",
    "reader": "operator token or a worker credential",
}


class Ctx:
    """What a handler sees: the request, the coordinator, the caller and the parsed body."""

    def __init__(self, request: Request, coord: Coordinator, worker_id: str | None, body: Any):
        self.request = request
        self.coord = coord
        self.worker_id = worker_id
        self.body = body

    def path(self, name: str) -> str:
        return str(self.request.path_params[name])

    def query_int(self, name: str, default: int) -> int:
        raw = self.request.query_params.get(name)
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            raise BadRequest(f"query parameter {name!r} must be an integer, got {raw!r}") from None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await run_in_threadpool(fn, *args, **kwargs)

    @property
    def worker(self) -> str:
        assert self.worker_id is not None, "worker endpoint without worker auth"
        return self.worker_id


Handler = Callable[[Ctx], Awaitable[BaseModel | Response | None]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    auth: Auth
    summary: str
    body: type[BaseModel] | None
    response: type[BaseModel] | None
    raw_body: str | None  # media type of a streamed (non-JSON) body


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.to_json(), status_code=err.status_code)


class RouteTable:
    def __init__(self) -> None:
        self.endpoints: list[Endpoint] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        auth: Auth,
        summary: str,
        body: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        raw_body: str | None = None,
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.endpoints.append(
                Endpoint(method, path, handler, auth, summary, body, response, raw_body)
            )
            return handler

        return register

    def include(self, other: RouteTable) -> None:
        self.endpoints.extend(other.endpoints)

    # serving ----------------------------------------------------------------------------
    def starlette_routes(self, coord: Coordinator) -> list[Route]:
        return [Route(ep.path, self._wrap(ep, coord), methods=[ep.method]) for ep in self.endpoints]

    def _wrap(self, ep: Endpoint, coord: Coordinator) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                worker_id = await authenticate(ep.auth, request, coord)
                body = await self._parse(ep, request) if ep.body else None
                result = await ep.handler(Ctx(request, coord, worker_id, body))
                if isinstance(result, Response):
                    response = result
                elif result is None:
                    response = Response(status_code=204)
                else:
                    response = JSONResponse(result.model_dump(mode="json"))
            except ApiError as err:
                response = error_response(err)
            coord.metrics.observe_request(
                ep.method, ep.path, response.status_code, time.perf_counter() - started
            )
            return response

        return endpoint

    @staticmethod
    async def _parse(ep: Endpoint, request: Request) -> BaseModel:
        assert ep.body is not None
        raw = await request.body()
        if len(raw) > MAX_JSON_BYTES:
            raise BadRequest(f"request body over {MAX_JSON_BYTES} bytes")
        try:
            data = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(f"request body is not valid JSON: {err}") from None
        try:
            return ep.body.model_validate(data)
        except ValidationError as err:
            problems = [
                {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"]}
                for e in err.errors()
            ]
            summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
            raise BadRequest(f"invalid request body: {summary}", problems=problems) from None

    # description ------------------------------------------------------------------------
    def openapi(self, version: str) -> dict[str, Any]:
        models: set[type[BaseModel]] = {
            m for ep in self.endpoints for m in (ep.body, ep.response) if m
        }
        keyed = [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)]
        _, defs = models_json_schema(keyed, ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]
        paths: dict[str, dict[str, Any]] = {}
        for ep in self.endpoints:
            op: dict[str, Any] = {
                "summary": ep.summary,
                "description": f"Authentication: {_AUTH_DOC[ep.auth]}.",
                "responses": {"default": {"description": "error: {error, message}"}},
            }
            if ep.auth != "none":
                op["security"] = [{"bearer": []}]
            if ep.body:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(ep.body)}},
                }
            if ep.raw_body:
                op["requestBody"] = {
                    "required": True,
                    "content": {ep.raw_body: {"schema": {"type": "string", "format": "binary"}}},
                }
            if ep.response:
                op["responses"]["200"] = {
                    "description": "OK",
                    "content": {"application/json": {"schema": _ref(ep.response)}},
                }
            else:
                op["responses"]["200"] = {"description": "OK"}
            params = [seg[1:-1] for seg in ep.path.split("/") if seg.startswith("{")]
            if params:
                op["parameters"] = [
                    {
                        "name": p.split(":")[0],
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                    for p in params
                ]
            path = "/".join(
                seg.split(":")[0] + "}" if seg.startswith("{") and ":" in seg else seg
                for seg in ep.path.split("/")
            )
            paths.setdefault(path, {})[ep.method.lower()] = op
        return {
            "openapi": "3.1.0",
            "info": {"title": "trainfleet coordinator", "version": version},
            "paths": paths,
            "components": {
                "schemas": defs.get("$defs", {}),
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
        }


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}
