"""Names and the base of every manifest spec, shared by jobs (``spec``) and runs (``runs``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from trainfleet.capability.model import HOST_NAME_PATTERN, is_host_name

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
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
    model_config = ConfigDict(extra="forbid", frozen=True)
