"""The hot worker endpoints served in front of Starlette: claim, heartbeat and complete, and
their batch forms (issue 9).

A busy fleet spends most of the coordinator's requests on these six, and about half of their
server time went to the framework around the work: Starlette's middleware and its route
scan (a regular expression per route until one matches), a ``Request`` and a body stream,
pydantic validating the body, a ``Response`` object. ``FastPath`` is an ASGI wrapper that
takes exactly those six routes off that path:

- the route is found by one dictionary lookup on the raw path (``/v1/jobs/{job_id}/...`` by
  its suffix, the job id a plain printable-ASCII segment);
- the caller comes from the credential cache (``auth.TokenCache``); a miss goes the slow way;
- a body of at most ``endpoints.INLINE_PARSE_BYTES`` (a hot body is a few dozen bytes) is
  read, decoded by the same ``bodies.parse_json`` (the standard library's json: decoding is
  a few microseconds of a request's hundred or more, so no faster parser is worth a
  dependency), and checked by hand against the body's model (``_parse_*``): a body the
  model would accept unchanged becomes that model without validation (``model_construct``).
  A batch body (a list of beats or results) is validated by its model instead, the slow
  path's own call: for a list that is faster than a hand check of each item;
- the route's own handler runs, as it would behind Starlette (one hop to the writer, the
  heartbeat book, the long poll), and its reply goes out as pre-encoded bytes.

Anything unusual goes to the Starlette app instead, with the body it has read so far handed
on unchanged: a credential the cache does not hold, a quoted or odd job id, a larger body
(declared or read), a body the model would refuse (an unknown key...) or, for a single
job's body, coerce (a string epoch). The answer to such a request, and to every other route,
is then exactly what it always was: its error body, its status, its OpenAPI entry. A
request the fast path does answer gets the same reply as the slow path would give
(``tests/coordinator/test_fastpath.py`` runs a table of requests through both), and counts in
the same request metrics.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trainfleet.coordinator.bodies import parse_json
from trainfleet.coordinator.endpoints import (
    INLINE_PARSE_BYTES,
    INT64_MAX,
    Ctx,
    Endpoint,
    error_response,
)
from trainfleet.coordinator.longpoll import MAX_WAIT_S, ClaimWait
from trainfleet.coordinator.routes_batch import (
    MAX_ITEMS,
    ClaimsBody,
    CompletionsBody,
    HeartbeatsBody,
)
from trainfleet.coordinator.schemas import CompleteBody, EpochBody
from trainfleet.errors import ApiError

if TYPE_CHECKING:
    from trainfleet.coordinator.state import Coordinator

JOB_PARAM = "{job_id}"
MAX_JOB_REF = 256  # endpoints.JOB_REF's max_length
_PLAIN_BYTES = bytes(range(0x20, 0x7F)).replace(b"%", b"")  # printable ASCII but '%'
_JSON_HEADERS = [(b"content-type", b"application/json")]
_Parse = Callable[[Any], BaseModel | None]


class _Unusual(Exception):
    """The body is not one the fast path answers: the slow path does."""


# Hand checks of the hot bodies. Each returns the model the slow path's validation would
# build, or raises _Unusual for anything it would refuse OR coerce (a bool or a string
# where an int is declared, a float epoch), so that only exact inputs are taken here.


def _keys(data: Any, required: frozenset[str], allowed: frozenset[str]) -> dict[str, Any]:
    if type(data) is not dict or not required <= data.keys() <= allowed:
        raise _Unusual
    return data


def _int(value: Any, low: int, high: int = INT64_MAX) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _Unusual
    return value


def _wait_s(data: dict[str, Any]) -> float:
    value = data.get("wait_s", 0.0)
    if type(value) not in (int, float) or not 0 <= value <= MAX_WAIT_S or math.isnan(value):
        raise _Unusual
    return float(value)


def _result(data: dict[str, Any]) -> dict[str, Any]:
    result = data.get("result", {})
    if type(result) is not dict:
        raise _Unusual
    return result


_EPOCH = frozenset({"epoch"})


def _parse_claim(data: Any) -> ClaimWait:
    body = _keys(data, frozenset(), frozenset({"wait_s"}))
    return ClaimWait.model_construct(wait_s=_wait_s(body))


def _parse_claims(data: Any) -> ClaimsBody:
    body = _keys(data, frozenset(), frozenset({"max_jobs", "wait_s"}))
    max_jobs = _int(body.get("max_jobs", 1), 1, MAX_ITEMS)
    return ClaimsBody.model_construct(max_jobs=max_jobs, wait_s=_wait_s(body))


def _parse_epoch(data: Any) -> EpochBody:
    return EpochBody.model_construct(epoch=_int(_keys(data, _EPOCH, _EPOCH)["epoch"], 1))


def _parse_complete(data: Any) -> CompleteBody:
    body = _keys(data, _EPOCH, frozenset({"epoch", "result"}))
    return CompleteBody.model_construct(epoch=_int(body["epoch"], 1), result=_result(body))


def _validated(model: type[BaseModel]) -> _Parse:
    """A batch body checked by its model's own validation, as the slow path checks it (the
    same call, so the same model for every body it accepts): for a list of items that is
    several times faster than checking each item by hand and building it unvalidated. A
    body it refuses goes the slow way, which answers the 422."""

    def parse(data: Any) -> BaseModel:
        try:
            return model.model_validate(data)
        except ValidationError:
            raise _Unusual from None

    return parse


# The hot routes by their handler's name (the route table's operation id): a route renamed or
# moved keeps its fast path, a route removed loses it.
PARSERS: dict[str, _Parse] = {
    "claim": _parse_claim,
    "claim_batch": _parse_claims,
    "heartbeat": _parse_epoch,
    "heartbeat_batch": _validated(HeartbeatsBody),
    "complete": _parse_complete,
    "complete_batch": _validated(CompletionsBody),
}


@dataclass(frozen=True)
class _Hot:
    endpoint: Endpoint
    parse: _Parse


class FastPath:
    """ASGI wrapper: the hot routes of ``endpoints`` (``PARSERS``) answered here, everything
    else (and anything unusual about a hot request) passed to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        coord: Coordinator,
        endpoints: list[Endpoint],
        on_error: Callable[[Request, Exception], Awaitable[Response]] | None = None,
    ) -> None:
        self.app = app
        self.coord = coord
        self.on_error = on_error  # the app's reply to an unexpected error (a JSON 500)
        self.exact: dict[bytes, _Hot] = {}  # "/v1/claims" -> its route
        self.job_prefix = b""  # "/v1/jobs/"
        self.by_suffix: dict[bytes, _Hot] = {}  # "/heartbeat" -> its route
        self._observers: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self.served = 0  # requests answered here (the rest went to ``app``)
        for ep in endpoints:
            parse = PARSERS.get(ep.operation_id)
            if parse is None or ep.method != "POST":
                continue
            hot = _Hot(ep, parse)
            if "{" not in ep.path:
                self.exact[ep.path.encode()] = hot
                continue
            prefix, param, suffix = ep.path.partition(JOB_PARAM)
            assert param and "{" not in suffix and "/" not in suffix[1:], ep.path
            assert self.job_prefix in (b"", prefix.encode()), ep.path
            self.job_prefix = prefix.encode()
            self.by_suffix[suffix.encode()] = hot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot, job_id = None, None
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            hot, job_id = self._route(scope.get("raw_path"))
        if hot is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            worker_id, read, body = await self._accept(hot, scope, receive)
        except Exception as err:
            await self._fail(hot.endpoint, scope, receive, send, err, started)
            raise
        if worker_id is None or body is None:  # the slow path answers, from the same bytes
            await self.app(scope, _Replay(read, receive) if read else receive, send)
            return
        await self._serve(hot.endpoint, scope, receive, send, worker_id, body, job_id)

    async def _accept(
        self, hot: _Hot, scope: Scope, receive: Receive
    ) -> tuple[str | None, list[Message], BaseModel | None]:
        """The caller (None: not cached), the messages read and the checked body (None: not
        one the fast path answers)."""
        worker_id, length = self._caller(scope)
        if worker_id is None:
            return None, [], None
        read, raw = await _read_body(receive, length)
        if raw is None:
            return worker_id, read, None
        try:
            return worker_id, read, hot.parse(parse_json(raw))
        except (ApiError, _Unusual):
            return worker_id, read, None

    async def _fail(
        self,
        ep: Endpoint,
        scope: Scope,
        receive: Receive,
        send: Send,
        err: Exception,
        started: float,
    ) -> None:
        """Reply to an unexpected error as Starlette's ServerErrorMiddleware would, in front
        of which this runs: the app's own reply (a JSON 500). The caller raises it again."""
        if self.on_error is None:
            return
        response = await self.on_error(Request(scope, receive), err)
        self._observe(ep.path, response.status_code, started)
        await response(scope, receive, send)

    def _route(self, raw_path: Any) -> tuple[_Hot | None, str | None]:
        """The hot route of ``raw_path`` and its job id, if it is one."""
        if type(raw_path) is not bytes:
            return None, None
        hot = self.exact.get(raw_path)
        if hot is not None:
            return hot, None
        if not raw_path.startswith(self.job_prefix) or not self.job_prefix:
            return None, None
        segment, slash, suffix = raw_path[len(self.job_prefix) :].partition(b"/")
        hot = self.by_suffix.get(slash + suffix)
        if hot is None or not _plain_job_ref(segment):
            return None, None  # a quoted or odd id: Ctx.path's unquoting and checks apply
        return hot, segment.decode("ascii")

    def _caller(self, scope: Scope) -> tuple[str | None, int]:
        """The worker the credential cache names for this request's bearer token (None: the
        slow path decides), and how many body bytes the fast path may read."""
        token = ""
        length = INLINE_PARSE_BYTES  # no Content-Length: read up to this, then decide
        seen: set[bytes] = set()
        for name, value in scope["headers"]:
            if name in seen:
                continue  # the first of each counts, as in Starlette's ``headers.get``
            seen.add(name)
            if name == b"authorization":
                scheme, _, rest = value.decode("latin-1").partition(" ")
                token = rest.strip() if scheme.lower() == "bearer" and rest else ""
            elif name == b"content-length":
                length = int(value) if value.isdigit() else -1
        if not token or not 0 <= length <= INLINE_PARSE_BYTES:
            return None, 0
        return self.coord.tokens.get("worker", token), length

    async def _serve(
        self,
        ep: Endpoint,
        scope: Scope,
        receive: Receive,
        send: Send,
        worker_id: str,
        body: BaseModel,
        job_id: str | None,
    ) -> None:
        """Run the route's handler and send its reply, as ``RouteTable._wrap`` does."""
        started = time.perf_counter()
        self.served += 1
        path_values = None if job_id is None else {"job_id": job_id}
        ctx = Ctx(Request(scope, receive), self.coord, worker_id, body, ep, path_values)
        try:
            result = await ep.handler(ctx)
        except ApiError as err:
            response: Response = error_response(err)
            self._observe(ep.path, response.status_code, started)
            await response(scope, receive, send)
            return
        except Exception as err:
            await self._fail(ep, scope, receive, send, err, started)
            raise
        if isinstance(result, Response):  # not one of the hot handlers' own replies today
            self._observe(ep.path, result.status_code, started)
            await result(scope, receive, send)
            return
        assert result is not None, f"{ep.path} answered nothing"
        payload = result.__pydantic_serializer__.to_json(result)
        self._observe(ep.path, 200, started)
        headers = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _observe(self, route: str, status: int, started: float) -> None:
        """``Metrics.observe_request``, with the labelled children looked up once."""
        key = (route, status)
        children = self._observers.get(key)
        if children is None:
            metrics = self.coord.metrics
            children = (
                metrics.requests.labels("POST", route, str(status)),
                metrics.latency.labels(route),
            )
            self._observers[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - started)


def _plain_job_ref(segment: bytes) -> bool:
    """Printable ASCII without '%' (nothing to unquote), 1 to 256 bytes: the job id as is."""
    return 0 < len(segment) <= MAX_JOB_REF and not segment.translate(None, _PLAIN_BYTES)


async def _read_body(receive: Receive, limit: int) -> tuple[list[Message], bytes | None]:
    """The messages received and the whole body; body None if it is not a plain one of at
    most ``limit`` bytes (a disconnect, a body longer than declared)."""
    read: list[Message] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        read.append(message)
        if message["type"] != "http.request":
            return read, None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return read, None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return read, b"".join(chunks)


class _Replay:
    """A ``receive`` that hands on the messages already read, then the connection's own."""

    def __init__(self, read: list[Message], receive: Receive) -> None:
        self.read = deque(read)
        self.receive = receive

    async def __call__(self) -> Message:
        if self.read:
            return self.read.popleft()
        return await self.receive()


__all__ = ["PARSERS", "FastPath"]
