"""The OpenAPI 3.1 description of a route table: every path and query parameter with its
type, range or pattern; one security scheme per kind of token; every error response with
the error schema; links from a claim to the claimed job.

Request bodies use each model's validation schema and responses its serialization schema,
so a fuzzer checking responses against the description checks what is really sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

if TYPE_CHECKING:
    from trainfleet.coordinator.endpoints import Endpoint

SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "joinToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "a host's join token (trainfleet hosts enroll NAME), or the shared"
        " one in open mode: only registers a worker",
    },
    "workerCredential": {
        "type": "http",
        "scheme": "bearer",
        "description": "a worker credential, as /v1/workers/register returns it",
    },
    "operatorToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "the operator token: every operator and read endpoint",
    },
    "attemptToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "a pipeline job attempt's token (JOB_ID.EPOCH.MAC), as the attach"
        " reply (POST /v1/jobs/{job_id}/pipeline) gives it: valid while that attempt runs",
    },
}

# The schemes each kind of caller (``Auth``) accepts: any one of them (OR).
ACCEPTS: dict[str, list[str]] = {
    "none": [],
    "join": ["joinToken"],
    "worker": ["workerCredential"],
    "operator": ["operatorToken"],
    "read": ["operatorToken"],  # or none, when the coordinator serves --public-reads
    "reader": ["operatorToken", "workerCredential"],
    "submitter": ["operatorToken", "joinToken"],  # a market submission's producer
    "market": ["operatorToken", "joinToken"],  # a market's terms and ledger (or none, public)
    "attempt": ["attemptToken"],  # a pipeline job's process (routes_pipelines)
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "every 4xx answer: a code, a message, and details that depend on the code",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "machine-readable code, e.g. bad_request"},
        "message": {"type": "string", "description": "what went wrong, for a person"},
    },
    "additionalProperties": True,
}

ERROR_TEXT = {
    400: "malformed request: a parameter, the body or its nesting depth",
    401: "missing, wrong or revoked token",
    403: "the token may not do this (e.g. register as another host than it is enrolled for)",
    404: "no such job, artifact, router or path",
    409: "the job is not in a state for this, or the claim's epoch is stale",
    413: "the body (or the declared upload size) is over its limit",
    422: "the uploaded bytes do not match their declared size or sha256",
    507: "the coordinator's storage is full: nothing was stored, retry later",
}


def error_codes(ep: Endpoint) -> list[int]:
    """The error statuses this endpoint can answer (4xx, and 507 for an upload)."""
    codes = {400, *ep.errors}
    if ep.auth != "none":
        codes.add(401)
    if ep.auth == "join":
        codes.add(403)  # a host's token used to register as another host
    if ep.path_params:
        codes.add(404)
    if ep.method != "GET" and ep.auth in ("worker", "operator", "attempt"):
        codes.add(409)
    if ep.body or ep.raw_body:
        codes.add(413)
    if ep.raw_body:
        codes.update((422, 507))  # 507: the coordinator's disk is full
    return sorted(codes)


def describe(endpoints: list[Endpoint], version: str) -> dict[str, Any]:
    keyed: list[tuple[type[BaseModel], Any]] = sorted(
        {(ep.body, "validation") for ep in endpoints if ep.body}
        | {(ep.response, "serialization") for ep in endpoints if ep.response},
        key=lambda pair: (pair[0].__name__, pair[1]),
    )
    refs, defs = models_json_schema(keyed, ref_template="#/components/schemas/{model}")
    schemas = dict(defs.get("$defs", {}))
    schemas["Error"] = ERROR_SCHEMA
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        op = _operation(ep, refs)
        path = "/".join(
            seg.split(":")[0] + "}" if seg.startswith("{") and ":" in seg else seg
            for seg in ep.path.split("/")
        )
        paths.setdefault(path, {})[ep.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "trainfleet coordinator", "version": version},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": SECURITY_SCHEMES},
    }


def _operation(ep: Endpoint, refs: dict[Any, Any]) -> dict[str, Any]:
    accepts = ACCEPTS.get(ep.auth, ["operatorToken"])
    op: dict[str, Any] = {
        "operationId": ep.operation_id,
        "summary": ep.summary,
        "description": "Authentication: " + (" or ".join(accepts) if accepts else "none") + ".",
        "responses": {},
    }
    if accepts:
        op["security"] = [{scheme: []} for scheme in accepts]
    params = [{"in": "path", "required": True, **_param(p)} for p in ep.path_params]
    params += [{"in": "query", "required": p.required, **_param(p)} for p in ep.query]
    if params:
        op["parameters"] = params
    if ep.body:
        op["requestBody"] = {
            # A body whose every field has a default may be left out (a plain claim).
            "required": any(f.is_required() for f in ep.body.model_fields.values()),
            "content": {"application/json": {"schema": refs[(ep.body, "validation")]}},
        }
    if ep.raw_body:
        op["requestBody"] = {
            "required": True,
            "content": {ep.raw_body: {"schema": {"type": "string", "format": "binary"}}},
        }
    ok: dict[str, Any]
    if ep.response:
        ok = {
            "description": "Created" if ep.status == 201 else "OK",
            "content": {"application/json": {"schema": refs[(ep.response, "serialization")]}},
        }
    elif ep.media_type:
        schema = {"type": "object"} if ep.media_type == "application/json" else {"type": "string"}
        ok = {"description": "OK", "content": {ep.media_type: {"schema": schema}}}
    else:
        op["responses"]["204"] = {"description": "Done (no body)"}
        ok = {}
    if ok:
        if ep.links:
            ok["links"] = ep.links
        op["responses"][str(ep.status)] = ok
    for code in error_codes(ep):
        op["responses"][str(code)] = {
            "description": ERROR_TEXT.get(code, "error"),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return op


def _param(p: Any) -> dict[str, Any]:
    return {"name": p.name, "description": p.description, "schema": p.schema()}
