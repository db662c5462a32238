"""The commands `serve` prints are runnable as printed, whatever it was started with."""

from __future__ import annotations

import socket
from pathlib import Path

from trainfleet import env
from trainfleet.cli.hints import serve_hints

DEFAULT = Path(env.DEFAULT_STATE_DIR)


def hints(**overrides: object) -> list[str]:
    options: dict[str, object] = {
        "host": "127.0.0.1",
        "port": env.DEFAULT_PORT,
        "tls": False,
        "state_dir": DEFAULT,
        "default_state_dir": DEFAULT,
        "open_join": False,
    }
    return serve_hints(**{**options, **overrides})  # type: ignore[arg-type]


def test_with_the_defaults_the_enroll_command_needs_no_flag() -> None:
    lines = hints()
    assert "  trainfleet hosts enroll NAME --token-file NAME.token" in lines
    assert "enroll a host (in another shell, in this directory):" in lines
    assert f"  trainfleet join {env.DEFAULT_URL} --token-file NAME.token" in lines
    assert any("this machine only: serve --host 0.0.0.0" in line for line in lines)


def test_every_interface_over_tls_names_this_machine_never_the_wildcard(tmp_path: Path) -> None:
    name = socket.gethostname()
    lines = hints(host="0.0.0.0", port=9443, tls=True, state_dir=tmp_path, open_join=True)
    text = "\n".join(lines)
    assert lines[0].startswith("coordinator on https://0.0.0.0:9443, every interface  (state")
    assert (
        f"  trainfleet hosts enroll NAME --token-file NAME.token --url https://{name}:9443"
        f" --state-dir {tmp_path} --ca-cert CA.pem" in lines
    )
    assert (
        f"  trainfleet join https://{name}:9443 --token-file NAME.token --ca-cert CA.pem" in lines
    )
    assert "in this directory" not in text  # an absolute --state-dir works from anywhere
    assert "0.0.0.0" not in "\n".join(line for line in lines if "trainfleet " in line)
    assert f"open join is ON: the shared token in {tmp_path / 'join.token'}" in text


def test_an_ipv6_wildcard_is_bracketed_and_reached_locally_on_the_loopback() -> None:
    lines = hints(host="::", port=8471)
    assert any(line.endswith("--url http://[::1]:8471") for line in lines), lines
