"""Request bodies read within bounds: size counted while streaming, nesting depth scanned
before any recursive parser sees the text.

A JSON body is refused (413) as soon as its ``Content-Length`` or the bytes received so far
pass ``MAX_JSON_BYTES``, so the coordinator never holds more than the limit. Its nesting depth
is scanned before ``json.loads`` (whose C scanner recurses once per level) and the same scan,
with TOML's string and comment rules, guards a manifest before ``tomllib`` does.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request

from trainfleet.errors import BadRequest, PayloadTooLarge

MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64  # nesting levels of a JSON body (a manifest has its own: manifest.load)

# A JSON string (possessive: linear even on pathological input), a run of brackets, or a
# quote that opens a string never closed (the rest of the text is inside it).
_JSON_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]++|"')
_TOML_TOKENS = re.compile(
    r'"""(?:[^"\\]++|\\.|"(?!""))*+"""'  # multi-line basic string
    r"|'''(?:[^']++|'(?!''))*+'''"  # multi-line literal string
    r'|"(?:[^"\\\n]++|\\.)*+"'  # basic string
    r"|'[^'\n]*+'"  # literal string
    r"|#[^\n]*+"  # comment
    r"|[\[\]{}]++"  # brackets
    r"|[\"']"  # an unterminated string: tomllib stops there
)
# The same strings and comments, then what tells a key from a value: '=', ',', newlines,
# single brackets, and runs of dots (a key ``a.b.c`` is a table nested once per dot).
_TOML_KEY_TOKENS = re.compile(_TOML_TOKENS.pattern.replace(r"[\[\]{}]++", r"[\[\]{}=,\n]|\.++"))


async def read_limited(request: Request, limit: int = MAX_JSON_BYTES) -> bytes:
    """The request body, refused with :class:`PayloadTooLarge` once it passes ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before a byte is read; a chunked
    body is counted as it arrives, so at most ``limit`` bytes (plus one chunk) are held.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BadRequest(f"malformed Content-Length header {declared[:40]!r}")
        if int(declared) > limit:
            raise PayloadTooLarge(
                f"request body of {int(declared)} bytes is over the {limit}-byte limit",
                limit_bytes=limit,
            )
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"request body is over the {limit}-byte limit", limit_bytes=limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _deepest(tokens: list[str], limit: int) -> int:
    """Deepest bracket nesting among ``tokens`` (whole strings and comments, which are
    skipped, and runs of brackets); stops counting once past ``limit``."""
    depth = deepest = 0
    for token in tokens:
        if token[0] in "\"'#":
            if len(token) == 1 and token != "#":
                break  # an unterminated string: the parser stops here
            continue
        for ch in token:
            if ch in "[{":
                depth += 1
                if depth > deepest:
                    deepest = depth
                    if deepest > limit:
                        return deepest
            else:
                depth = max(depth - 1, 0)
    return deepest


def json_too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether a JSON text nests deeper than ``limit``, scanned without recursion."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # too few brackets to nest that deep
    # latin-1 maps every byte to one character, so quotes and brackets stay where they are.
    return _deepest(_JSON_TOKENS.findall(raw.decode("latin-1")), limit) > limit


def toml_too_deep(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether a TOML text's arrays, inline tables, headers or dotted keys nest deeper than
    ``limit`` (tomllib recurses per bracket and is quadratic in a key's dots)."""
    if text.count(".") > limit and _dotted_key_too_deep(text, limit):
        return True
    if text.count("[") + text.count("{") <= limit:
        return False
    return _deepest(_TOML_TOKENS.findall(text), limit) > limit


def _dotted_key_too_deep(text: str, limit: int) -> bool:
    """Whether any key (``a.b.c = 1``, ``[a.b.c]``, ``{a.b = 1}``) has more than ``limit``
    dots. Dots in values (``x = 1.5``, arrays of floats) do not count."""
    opened: list[str] = []  # the brackets open around here
    in_value = False  # after '=', until the end of the value
    dots = 0
    for token in _TOML_KEY_TOKENS.findall(text):
        first = token[0]
        if first in "\"'#":
            if len(token) == 1 and first != "#":
                return False  # an unterminated string: tomllib stops here
        elif first == ".":
            if not in_value:
                dots += len(token)
                if dots > limit:
                    return True
        elif first == "=":
            in_value, dots = True, 0
        elif first == "\n":
            if not opened:
                in_value, dots = False, 0
        elif first == ",":
            if opened and opened[-1] == "{":
                in_value, dots = False, 0
        elif first in "[{":
            opened.append(first)
            if first == "{":
                in_value, dots = False, 0
        elif opened and opened.pop() == "{":  # the end of an inline table: its value ends
            in_value = True
    return False


def check_toml_depth(text: str, what: str, limit: int = MAX_DEPTH) -> None:
    """:class:`BadRequest` when a TOML text nests deeper than ``limit`` (before tomllib)."""
    if toml_too_deep(text, limit):
        raise BadRequest(f"{what} nests deeper than {limit} levels")


def _not_json(constant: str) -> Any:
    raise BadRequest(
        f"request body is not valid JSON: {constant} is not a JSON number (send null instead)"
    )


# json.loads(raw, parse_constant=...) builds a decoder for every call; one serves them all.
_DECODER = json.JSONDecoder(parse_constant=_not_json)


def parse_json(raw: bytes, limit: int = MAX_DEPTH) -> Any:
    """Decode a JSON body whose nesting is at most ``limit``; :class:`BadRequest` otherwise."""
    if json_too_deep(raw, limit):
        raise BadRequest(f"request body nests deeper than {limit} levels")
    try:
        if raw.isascii() and b"\x00" not in raw:  # UTF-8 for sure (no UTF-16/32 zeros)
            value = _DECODER.decode(raw.decode("ascii") or "{}")
        else:
            value = json.loads(raw, parse_constant=_not_json)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an int of >4300 digits
        raise BadRequest(f"request body is not valid JSON: {err}") from None
    except RecursionError:  # unreachable after the scan; kept as a last line of defence
        raise BadRequest(f"request body nests deeper than {limit} levels") from None
    # A lone surrogate ("\ud800", or raw in a UTF-16 body) is valid JSON but no Unicode
    # text: SQLite and every encoder downstream refuse it. It can only come from an escape
    # or a non-ASCII byte, so plain ASCII bodies skip the check.
    if (b"\\u" in raw or not raw.isascii()) and _has_lone_surrogate(value):
        raise BadRequest("request body is not valid JSON text: it holds a lone UTF-16 surrogate")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
