"""Schemathesis against a live coordinator, with each kind of token: the served OpenAPI
description is complete enough to reach every endpoint, and no generated request, valid or
not, gets a server error or an answer the description does not allow.

Bounded and derandomized: a fixed number of examples per operation, generation mode and
token, the same every run (CI is deterministic). Failures are collected over the whole
sweep and reported together.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fleetkit import make_cap
from trainfleet.client import Client
from trainfleet.testing import LiveFleet

# Examples per operation and generation mode, by token. Without a valid token almost every
# answer is a 401, so fewer examples and valid inputs only suffice there.
EXAMPLES = {"operator": 10, "worker": 10, "join": 4, "none": 3}
BOTH = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
MODES = {"operator": BOTH, "worker": BOTH, "join": BOTH, "none": (GenerationMode.POSITIVE,)}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MANIFEST = """
[[jobs]]
name = "alpha"
hyper = { steps = 5 }
"""
WHO = ["operator", "worker", "join", "none"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFleet]:
    with LiveFleet(tmp_path_factory.mktemp("fuzz"), heartbeat_timeout_s=30.0) as live:
        live.reload(MANIFEST)
        yield live


@pytest.fixture(scope="module")
def tokens(fleet: LiveFleet) -> dict[str, str | None]:
    join = fleet.worker_token("fuzz-worker")
    with Client(fleet.url, join) as c:
        worker = c.register(make_cap("fuzz-worker").model_dump(mode="json"))["token"]
    return {
        "operator": fleet.coord.operator_token,
        "worker": worker,
        "join": fleet.worker_token("fuzz-join"),
        "none": None,
    }


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("who", WHO)
def test_the_api_conforms_to_its_description_under_fuzzing(
    fleet: LiveFleet, tokens: dict[str, str | None], who: str
) -> None:
    schema = schemathesis.openapi.from_url(f"{fleet.url}/openapi.json")
    token = tokens[who]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    failures: list[str] = []
    operations = 0
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            operations += 1
            for mode in MODES[who]:
                _fuzz(operation, mode, EXAMPLES[who], fleet.url, session, headers, failures)
            if "{job_id}" in operation.path and who != "none":
                # Random references are all 404s: also reach the handlers behind them.
                known = {"job_id": "alpha"}
                _fuzz(operation, BOTH[0], EXAMPLES[who], fleet.url, session, headers, failures,
                      known)  # fmt: skip
    assert operations >= 20
    assert not failures, f"{len(failures)} failure(s) with the {who} token:\n" + "\n".join(
        failures[:20]
    )


def _not_http(response: requests.Response) -> bool:
    """The HTTP parser's own refusal of bytes that are not a valid HTTP request (a header
    name with a ';', say): the server answers 400 in plain text before any route runs, so
    no operation's description can cover it. Everything that parses reaches the app."""
    return response.status_code == 400 and response.text == "Invalid HTTP request received."


def _fuzz(
    operation: Any,
    mode: GenerationMode,
    examples: int,
    url: str,
    session: requests.Session,
    headers: dict[str, str],
    failures: list[str],
    path_parameters: dict[str, str] | None = None,
) -> None:
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call(base_url=url, session=session, headers=headers, timeout=30)
        if _not_http(response):
            return
        case.validate_response(response, checks=CHECKS)

    try:
        run()
    except Unsatisfiable:  # negative mode on an operation with nothing to make invalid
        assert mode is GenerationMode.NEGATIVE
    except (Exception, BaseExceptionGroup) as err:  # schemathesis raises a BaseExceptionGroup
        # The first failure of this operation and mode; the sweep goes on.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        failures.append(f"{operation.label} ({mode.value}): " + " | ".join(lines[:12]))
