"""``attach.json``: what a worker hands a producer or consumer program about its attempt.

The worker asks the coordinator to attach the attempt (``POST /v1/jobs/{job}/pipeline``),
adds ``coordinator`` (the URL) and ``ca`` (a CA file or null) to the reply, and writes it,
mode 0600, into the attempt directory. The programs (``pipeline.producer``,
``pipeline.consumer``) read it with ``load_attach``, which names the offending field of a
malformed file instead of failing later with a traceback. ``run_program`` maps what a
program raises to its exit code, as ``python -m trainfleet.train`` does.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainfleet import env
from trainfleet.errors import CoordinatorUnavailable, CorpusTooSmall, DataError, FeatureError
from trainfleet.manifest.pipelines import PipelineSpec
from trainfleet.train.recipes import GPTParams

Role = Literal["producer", "consumer"]
EXIT_DATA = 1
EXIT_USAGE = 2


class AttachError(ValueError):
    """``attach.json`` cannot be read, is malformed, or is for another role."""


class Attach(BaseModel):
    """The attach reply plus the coordinator's address (fields the programs read)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    pipeline_id: str = Field(pattern=r"^[0-9a-f]{64}$", description="the pipeline's id")
    name: str = Field(min_length=1, description="the pipeline's name")
    role: Role = Field(description="what this job is: a teacher producer or a student consumer")
    index: int = Field(ge=0, description="producer p or consumer k")
    secret: str = Field(
        pattern=r"^([0-9a-f]{2}){16,}$", description="the pipeline secret, hex (>= 16 bytes)"
    )
    attempt_token: str = Field(min_length=1, description="authenticates this attempt's calls")
    spec: PipelineSpec = Field(description="the pipeline's spec")
    teacher_model: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="sha256 of the teacher's weights"
    )
    teacher_params: GPTParams | None = Field(None, description="the teacher's gpt params")
    coordinator: str = Field(min_length=1, description="the coordinator's base URL")
    ca: str | None = Field(None, description="CA file to trust for an https coordinator")

    @property
    def secret_bytes(self) -> bytes:
        return bytes.fromhex(self.secret)


def _describe(error: ValidationError) -> str:
    parts = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "attach"
        parts.append(f"{where}: {problem['msg']}")
    return "; ".join(parts)


def load_attach(path: Path, role: Role) -> Attach:
    """The attach file at ``path`` for a program of ``role``; ``AttachError`` says what is
    wrong with it (unreadable, not JSON, a field missing or malformed, another role)."""
    try:
        raw: Any = json.loads(path.read_text())
    except OSError as e:
        raise AttachError(f"cannot read --attach {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise AttachError(f"--attach {path} is not JSON: {e}") from e
    if not isinstance(raw, dict):
        raise AttachError(f"--attach {path}: want a JSON object, got {type(raw).__name__}")
    try:
        attach = Attach.model_validate(raw)
    except ValidationError as e:
        raise AttachError(f"invalid --attach {path}: {_describe(e)}") from e
    if attach.role != role:
        raise AttachError(f"--attach {path} is for a {attach.role}, this is the {role} program")
    if role == "producer" and attach.teacher_params is None:
        raise AttachError(f"invalid --attach {path}: teacher_params: a producer needs them")
    return attach


def checked_student(attach: Attach) -> GPTParams:
    """The student's params of the attached spec; AttachError names what is wrong."""
    from trainfleet.pipeline.distill import student_params

    try:
        return student_params(attach.spec)
    except ValueError as e:  # pydantic's ValidationError is one
        raise AttachError(f"invalid --attach spec.student: {e}") from e


def num_threads_from_env() -> int | None:
    """``TRAINFLEET_NUM_THREADS`` as a positive int, None when unset; AttachError if bad."""
    text = os.environ.get(env.NUM_THREADS, "")
    if text and not (text.isdigit() and int(text) > 0):
        raise AttachError(f"{env.NUM_THREADS} must be a positive integer, got {text!r}")
    return int(text) if text else None


def run_program(work: Callable[[], object], prog: str) -> int:
    """Run a pipeline program's ``work`` and map what it raises to an exit code: 2 a bad
    attach file, setting or too little data (one line on stderr); 75 (``FENCED_EXIT``) the
    coordinator wrote this attempt off; 1 data, store or coordinator trouble (another attempt
    may succeed); 0 when it returns."""
    from trainfleet.pipeline.client import FENCED_EXIT, AttemptFenced

    def fail(message: str, code: int) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return code

    try:
        work()
    except (AttachError, CorpusTooSmall) as e:
        return fail(str(e), EXIT_USAGE)
    except AttemptFenced as e:
        return fail(str(e), FENCED_EXIT)
    except (DataError, FeatureError, CoordinatorUnavailable) as e:
        return fail(str(e), EXIT_DATA)
    return 0
