"""Names and the base of every manifest spec, shared by jobs (``spec``) and runs (``runs``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from trainfleet.capability.model import HOST_NAME_PATTERN, is_host_name

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
# An integer the queue keeps in an SQL INTEGER column (64-bit signed): a priority. (A field
# with a bound of its own, like min_cores >= 1, says ``le=INT64_MAX`` instead: pydantic keeps
# the type's lower bound over the field's.)
INT64_MAX = 2**63 - 1
Int64 = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
HOST_NAME_RULE = "1-63 of letters, digits, '.', '_', '-', starting with a letter or digit"


def _enrollable(name: str, info: ValidationInfo) -> str:
    """A host name a manifest may give: one that can be enrolled (the capability model's
    policy), so never ``open:NAME`` (open-mode workers are not policy's to pin) nor a name
    longer than an enrollment allows. A spec read back from the queue (JSON) is taken as
    stored: an earlier release allowed any string, and such a name just matches no host."""
    if info.mode == "json" or is_host_name(name):
        return name
    raise PydanticCustomError(
        "host_name",
        "{name} is not a host name that can be enrolled ({rule})",
        {"name": repr(name[:80]), "rule": HOST_NAME_RULE},
    )


HostName = Annotated[
    str,
    AfterValidator(_enrollable),
    WithJsonSchema({"type": "string", "pattern": HOST_NAME_PATTERN}),
]


class _Spec(BaseModel):
    # No NaN or infinity anywhere in a manifest: the queue stores specs as JSON, which holds
    # neither (pydantic writes null), so such a spec could not be read back.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
