"""Who is calling: bearer tokens checked against the coordinator's credentials.

Kinds of caller (``Auth``): ``none``; ``join`` (the join token, or the operator token);
``worker`` (a credential from /v1/workers/register); ``operator``; ``reader`` (the operator
token or a worker credential).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Literal

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from trainfleet.errors import Unauthorized

if TYPE_CHECKING:
    from trainfleet.coordinator.state import Coordinator

Auth = Literal["none", "join", "worker", "operator", "reader"]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing 'Authorization: Bearer <token>' header")
    return token.strip()


async def authenticate(auth: Auth, request: Request, coord: Coordinator) -> str | None:
    if auth == "none":
        return None
    token = _bearer(request)
    if auth == "reader" and hmac.compare_digest(
        token.encode("latin-1"), coord.operator_token.encode()
    ):
        return None
    if auth in ("worker", "reader"):
        return await run_in_threadpool(coord.queue.authenticate_worker, token)
    expected = coord.join_token if auth == "join" else coord.operator_token
    # Compared as bytes: compare_digest raises TypeError on non-ASCII str (headers are
    # latin-1), which would turn a wrong token into a 500.
    given = token.encode("latin-1")
    # An operator may do anything a joining worker may.
    if hmac.compare_digest(given, expected.encode()) or (
        auth == "join" and hmac.compare_digest(given, coord.operator_token.encode())
    ):
        return None
    raise Unauthorized(f"wrong {auth} token")
