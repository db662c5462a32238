"""The HTTP route table: one declaration per endpoint gives auth, path and query parameters,
body validation, JSON errors and the endpoint's OpenAPI entry (``coordinator/openapi.py``),
so the served API and its description cannot drift apart.

Handlers are ``async def handler(ctx) -> BaseModel | Response | None``; blocking calls go
through ``ctx.run``, keeping the event loop free: queue calls on the coordinator's writer
(``coordinator/writer.py``), file I/O and CPU work on the threadpool. Parameters are
validated against their declaration before the handler runs: a path parameter against its
pattern, a query integer against its range (SQLite integers are 64-bit), a JSON body against
its size and nesting limits (``coordinator/bodies.py``) and then its model.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import unquote

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trainfleet.coordinator.auth import AttemptCaller, Auth, authenticate
from trainfleet.coordinator.bodies import MAX_JSON_BYTES, parse_json, read_limited
from trainfleet.coordinator.writer import run_hot, run_on
from trainfleet.errors import ApiError, BadRequest

if TYPE_CHECKING:
    from trainfleet.coordinator.state import Coordinator

log = logging.getLogger(__name__)

T = TypeVar("T")
INT64_MAX = 2**63 - 1
_INTEGER = re.compile(r"-?[0-9]{1,30}")
RAW_PATH_KEY = "trainfleet.raw_path"  # set by app.py: path parameters arrive still quoted
INLINE_PARSE_BYTES = 16 * 1024  # a JSON body up to this size is parsed on the event loop
JSON_MEDIA = "application/json"

__all__ = ["MAX_JSON_BYTES", "Ctx", "Endpoint", "Param", "RouteTable", "error_response"]


@dataclass(frozen=True)
class Param:
    """A declared path or query parameter: its OpenAPI schema and its validation."""

    name: str
    description: str
    kind: Literal["integer", "string"] = "string"
    minimum: int | None = None
    maximum: int | None = None
    default: int | str | None = None
    required: bool = False
    pattern: str | None = None
    max_length: int = 256
    enum: tuple[str, ...] = ()

    @property
    def bounds(self) -> tuple[int, int]:
        """An integer's range: the declared one, or SQLite's 64 bits."""
        low = -(2**63) if self.minimum is None else self.minimum
        return low, INT64_MAX if self.maximum is None else self.maximum

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind}
        if self.kind == "integer":
            out["minimum"], out["maximum"] = self.bounds
        elif self.enum:
            out["enum"] = list(self.enum)
        else:
            out["minLength"], out["maxLength"] = 1, self.max_length
            if self.pattern:
                out["pattern"] = self.pattern
        if self.default is not None:
            out["default"] = self.default
        return out

    def parse(self, raw: str | None, where: str = "query") -> int | str | None:
        """The validated value of ``raw`` (None: the default); :class:`BadRequest` if not."""
        what = f"{where} parameter {self.name!r}"
        if raw is None:
            if self.required:
                raise BadRequest(f"{what} is required: {self.description}")
            return self.default
        if self.kind == "integer":
            if not _INTEGER.fullmatch(raw):  # int() would also take "1_0", " 1", "٣"
                raise BadRequest(f"{what} must be an integer, got {raw[:40]!r}")
            value = int(raw)
            low, high = self.bounds
            if not low <= value <= high:
                raise BadRequest(f"{what} must be between {low} and {high}, got {value}")
            return value
        if self.enum and raw not in self.enum:
            raise BadRequest(f"{what} must be one of {list(self.enum)}, got {raw[:40]!r}")
        if len(raw) > self.max_length:
            raise BadRequest(f"{what} is longer than {self.max_length} characters")
        # fullmatch: with re.search, "$" would also match before a trailing newline.
        if self.pattern and not re.fullmatch(self.pattern, raw):
            raise BadRequest(f"{what} {raw[:80]!r} does not match {self.pattern}")
        return raw


# Path parameters by name; a route may declare others with ``path_params=``.
JOB_REF = Param(
    "job_id",
    "a job id, an unambiguous id prefix (4+ hex digits) or a job name; URL-quoted",
    pattern=r"^[^\x00-\x1f\x7f]{1,256}$",
)
HEX64 = r"^[0-9a-f]{64}$"
SHA256 = Param("sha256", "sha256 of the artifact's bytes (64 lowercase hex)", pattern=HEX64)
FIT_ID = Param("fit_id", "the dataset's router fit id (64 lowercase hex)", pattern=HEX64)
PATH_PARAMS = {p.name: p for p in (JOB_REF, SHA256, FIT_ID)}
ANY_SEGMENT = r"^[^\x00-\x1f\x7f]{1,256}$"


class Ctx:
    """What a handler sees: the request, the coordinator, the caller and the parsed body."""

    def __init__(
        self,
        request: Request,
        coord: Coordinator,
        worker_id: str | None,
        body: Any,
        endpoint: Endpoint | None = None,
        path_values: dict[str, str] | None = None,
    ):
        self.request = request
        self.coord = coord
        self.worker_id = worker_id
        self.body = body
        self.endpoint = endpoint
        self._path_values = path_values or {}

    def path(self, name: str) -> str:
        """A path parameter, unquoted and checked against its declared pattern."""
        if name in self._path_values:
            return self._path_values[name]
        return str(self.request.path_params[name])

    def _query(self, name: str) -> Param:
        query = self.endpoint.query if self.endpoint else ()
        declared = next((p for p in query if p.name == name), None)
        if declared is None:
            # Undeclared: still range-checked, but the OpenAPI document does not list it.
            log.warning("query parameter %r is not declared by its route", name)
            return Param(name, "(undeclared)", kind="integer")
        return declared

    def query_int(self, name: str, default: int | None = None) -> int:
        """A query integer, validated against its declaration (range, required, default)."""
        value = self._query(name).parse(self.request.query_params.get(name))
        if value is None:
            if default is None:
                raise BadRequest(f"query parameter {name!r} is required")
            return default
        assert isinstance(value, int)
        return value

    def query_str(self, name: str) -> str | None:
        """A query string, validated against its declaration (enum, pattern, length)."""
        value = self._query(name).parse(self.request.query_params.get(name))
        return None if value is None else str(value)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A queue method (bound to ``coord.queue``) on the writer, anything else (the
        artifact store's file I/O, manifest parsing, the round driver) on the threadpool."""
        if getattr(fn, "__self__", None) is self.coord.queue:
            return await self.run_db(fn, *args, **kwargs)
        return await self.run_io(fn, *args, **kwargs)

    async def run_db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` on ``coord.db_executor`` (``coordinator/writer.py``): queue transactions only,
        nothing slow."""
        return await run_on(self.coord.db_executor, fn, *args, **kwargs)

    async def run_hot(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``run_db`` for a hot route's short call (a claim, a completion): on SQLite it may
        run on the event loop itself (``writer.run_hot``). Never for anything that may take
        long: it would hold the loop."""
        return await run_hot(self.coord.db_executor, fn, *args, **kwargs)

    async def run_io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` on the ordinary threadpool: file I/O and CPU work that must not hold the
        writer."""
        return await run_in_threadpool(fn, *args, **kwargs)

    @property
    def worker(self) -> str:
        assert self.worker_id is not None, "worker endpoint without worker auth"
        return self.worker_id

    @property
    def attempt(self) -> AttemptCaller:
        """The pipeline attempt calling an ``attempt``-auth route (``auth.AttemptCaller``)."""
        caller = getattr(self.request.state, "attempt", None)
        assert isinstance(caller, AttemptCaller), "attempt endpoint without attempt auth"
        return caller


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
    query: tuple[Param, ...] = ()
    path_params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()  # status codes beyond those implied by auth, params and body
    media_type: str | None = None  # of a 200 that is not a JSON model (text, bytes)
    links: dict[str, Any] = field(default_factory=dict)  # OpenAPI links of the 200 response
    max_body_bytes: int = MAX_JSON_BYTES  # a JSON body past this is refused (413)
    status: int = 200  # of a success with a JSON model (201: it created something)
    # Whether the first beats the heartbeat book answered from memory are written before the
    # handler runs, so it reads every job whose worker was told it runs as ``running``
    # (``beats.HeartbeatBook.write_starts``). Off only for the claim, heartbeat and
    # completion routes, which write or fold those beats themselves.
    settles_beats: bool = True

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


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
        query: tuple[Param, ...] = (),
        path_params: tuple[Param, ...] = (),
        errors: tuple[int, ...] = (),
        media_type: str | None = None,
        links: dict[str, Any] | None = None,
        max_body_bytes: int = MAX_JSON_BYTES,
        status: int = 200,
        settles_beats: bool = True,
    ) -> Callable[[Handler], Handler]:
        own = {p.name: p for p in path_params}
        names = [seg[1:-1].split(":")[0] for seg in path.split("/") if seg.startswith("{")]
        declared = tuple(
            _with_pattern(own.get(n) or PATH_PARAMS.get(n) or Param(n, f"the {n}")) for n in names
        )

        def register(handler: Handler) -> Handler:
            self.endpoints.append(
                Endpoint(
                    method,
                    path,
                    handler,
                    auth,
                    summary,
                    body,
                    response,
                    raw_body,
                    query,
                    declared,
                    errors,
                    media_type,
                    links or {},
                    max_body_bytes,
                    status,
                    settles_beats,
                )
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
                path_values = _path_values(ep, request)
                body = await self._parse(ep, request) if ep.body else None
                ctx = Ctx(request, coord, worker_id, body, ep, path_values)
                if ep.settles_beats:
                    await coord.beats.write_starts(ctx.run_db)
                result = await ep.handler(ctx)
                if isinstance(result, Response):
                    response = result
                elif result is None:
                    response = Response(status_code=204)
                else:  # serialized by pydantic's core in one pass (no dict, no json.dumps)
                    response = Response(
                        result.model_dump_json(), status_code=ep.status, media_type=JSON_MEDIA
                    )
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
        raw = await read_limited(request, ep.max_body_bytes)
        # A small body (a heartbeat's epoch) is parsed here; a large one's depth scan and
        # decoding are CPU work, done off the event loop.
        if len(raw) <= INLINE_PARSE_BYTES:
            data = parse_json(raw)
        else:
            data = await run_in_threadpool(parse_json, raw)
        try:
            return ep.body.model_validate(data)
        except ValidationError as err:
            problems = [
                {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"]}
                for e in err.errors()
            ]
            summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
            raise BadRequest(f"invalid request body: {summary}", problems=problems) from None

    def openapi(self, version: str) -> dict[str, Any]:
        from trainfleet.coordinator.openapi import describe

        return describe(self.endpoints, version)


def _with_pattern(param: Param) -> Param:
    """A path parameter always has a pattern: one non-empty segment without controls."""
    return param if param.pattern else replace(param, pattern=ANY_SEGMENT)


def _path_values(ep: Endpoint, request: Request) -> dict[str, str]:
    """Each path parameter unquoted (app.py routes on the raw path, so a quoted '/' stays
    inside its segment) and checked against its declaration."""
    quoted = bool(request.scope.get(RAW_PATH_KEY))
    out: dict[str, str] = {}
    for param in ep.path_params:
        raw = str(request.path_params[param.name])
        try:
            value = unquote(raw, errors="strict") if quoted else raw
        except UnicodeDecodeError:
            raise BadRequest(f"path parameter {param.name!r} is not URL-quoted UTF-8") from None
        parsed = param.parse(value, where="path")
        out[param.name] = str(parsed)
    return out
