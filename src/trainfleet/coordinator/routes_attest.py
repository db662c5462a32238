"""Attestation endpoints of the private tier: a worker asks for a nonce, then presents a quote
binding its key, its measurement and that nonce (``verify.attest`` says what is checked, in
which order, and why). An accepted attestation lets the worker claim ``tier = "private"``
jobs until ``attested_until``; a refusal is a 403 whose ``reason`` names the check that
failed (400 for a malformed quote), and the worker keeps taking public work.
"""

from __future__ import annotations

from pydantic import Field

from trainfleet.coordinator.endpoints import Ctx, RouteTable
from trainfleet.coordinator.schemas import Body
from trainfleet.errors import Forbidden
from trainfleet.verify.attest import MAX_QUOTE_CHARS, AttestationPolicy

routes = RouteTable()

B64URL = r"^[A-Za-z0-9_-]+={0,2}$"


class NonceReply(Body):
    nonce: str = Field(description="64 hex digits: put it in the quote, sign it (possession)")
    expires_in: float = Field(description="seconds the nonce stays usable")


class AttestRequest(Body):
    quote: str = Field(
        min_length=1,
        max_length=MAX_QUOTE_CHARS,
        pattern=B64URL,
        description="base64url of the quote's canonical JSON",
    )
    signature: str = Field(
        min_length=1,
        max_length=128,
        pattern=B64URL,
        description="the attestation key's Ed25519 signature of the quote's encoded bytes",
    )
    worker_key: str = Field(
        min_length=1,
        max_length=64,
        pattern=B64URL,
        description="base64url of the worker's raw Ed25519 public key (the quote binds it)",
    )
    possession: str = Field(
        min_length=1,
        max_length=128,
        pattern=B64URL,
        description="the worker key's signature of 'trainfleet-attest:{nonce}'",
    )


class AttestReply(Body):
    worker_id: str
    measurement: str = Field(description="the measurement the quote attested")
    attested_until: float = Field(description="private jobs may be claimed until then")
    expires_in: float = Field(description="seconds until attested_until: attest again before")


def _policy(ctx: Ctx) -> AttestationPolicy:
    policy = ctx.coord.attestation
    if policy is None:
        raise Forbidden(
            "this coordinator pins no attestation key: private work is off"
            " (serve --attestation-key PUB.pem --measurements FILE)",
            reason="attestation_off",
        )
    return policy


@routes.route(
    "POST",
    "/v1/attest/nonce",
    auth="worker",
    summary="A fresh single-use nonce for this worker's next attestation quote",
    response=NonceReply,
    errors=(403,),
)
async def attest_nonce(ctx: Ctx) -> NonceReply:
    policy = _policy(ctx)
    nonce = await ctx.run(ctx.coord.queue.attest_nonce, ctx.worker, policy.nonce_ttl_s)
    return NonceReply(nonce=nonce, expires_in=policy.nonce_ttl_s)


@routes.route(
    "POST",
    "/v1/attest",
    auth="worker",
    summary="Present an attestation quote; private jobs become claimable until attested_until",
    body=AttestRequest,
    response=AttestReply,
    errors=(403,),
)
async def attest(ctx: Ctx) -> AttestReply:
    policy, body, queue = _policy(ctx), ctx.body, ctx.coord.queue
    assert isinstance(body, AttestRequest)
    # Signature and enclave first, so an unsigned quote never reaches the database.
    quote = await ctx.run_io(policy.verifier.open, body.quote, body.signature)
    await ctx.run(queue.check_attest_nonce, ctx.worker, quote.nonce)
    await ctx.run_io(
        policy.verifier.verify,
        body.quote,
        body.signature,
        nonce=quote.nonce,
        worker_key=body.worker_key,
        now=queue.clock(),
        possession=body.possession,
    )
    until = queue.clock() + policy.ttl_s
    await ctx.run(queue.attest_worker, ctx.worker, quote.nonce, quote.measurement, until)
    ctx.coord.work.notify()  # private work may now be claimable by it
    return AttestReply(
        worker_id=ctx.worker,
        measurement=quote.measurement,
        attested_until=until,
        expires_in=policy.ttl_s,
    )


__all__ = ["AttestReply", "AttestRequest", "NonceReply", "routes"]
