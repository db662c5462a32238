"""Path and query parameters are checked against their whole declared pattern."""

from __future__ import annotations

import pytest

from trainfleet.coordinator.endpoints import FIT_ID, SHA256, Param
from trainfleet.errors import BadRequest


@pytest.mark.parametrize("param", [SHA256, FIT_ID])
def test_a_trailing_newline_does_not_pass_a_pattern(param: Param) -> None:
    digest = "ab" * 32
    assert param.parse(digest, "path") == digest
    with pytest.raises(BadRequest):
        param.parse(digest + "\n", "path")
