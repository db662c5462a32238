"""A coordinator certificate that fails verification ends ``join`` at once with one clear
line (retrying cannot fix it); an unreachable coordinator is still retried."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tlskit import tls_server
from trainfleet.cli.main import app
from trainfleet.client import Client
from trainfleet.errors import CoordinatorUnavailable, NotFound, UntrustedCertificate
from trainfleet.worker.daemon import Worker, WorkerConfig


def test_an_untrusted_certificate_is_its_own_error_and_a_trusted_one_is_not(
    tmp_path: Path,
) -> None:
    with tls_server(tmp_path) as (url, ca, _):
        with Client(url) as untrusting, pytest.raises(UntrustedCertificate) as refused:
            untrusting.register({})
        message = str(refused.value)
        assert "\n" not in message
        assert "certificate is not trusted" in message and "--ca-cert" in message
        assert "self-signed" in message  # what the TLS library said, not just that it failed
        with Client(url, ca_cert=ca) as trusting, pytest.raises(NotFound):
            trusting.register({})  # the same server, trusted: an HTTP answer comes back
        by_name = Client(url.replace("127.0.0.1", "localhost"), ca_cert=ca)
        with by_name, pytest.raises(NotFound):
            by_name.register({})  # the certificate lists localhost too


def test_a_certificate_for_another_address_says_so(tmp_path: Path) -> None:
    with tls_server(tmp_path, address="127.0.0.2") as (url, ca, _):  # it lists 127.0.0.1
        client = Client(url, ca_cert=ca)
        with client, pytest.raises(UntrustedCertificate) as refused:
            client.register({})
    assert "not valid for this address" in str(refused.value)
    assert "127.0.0.2" in str(refused.value)


def test_a_connection_refused_is_not_a_certificate_error(tmp_path: Path) -> None:
    with tls_server(tmp_path) as (url, _, _):
        pass  # the server is gone: its port now refuses connections
    with Client(url) as client, pytest.raises(CoordinatorUnavailable) as err:
        client.register({})
    assert not isinstance(err.value, UntrustedCertificate)


class CountingClient(Client):
    registers = 0

    def register(self, capability: dict[str, Any]) -> dict[str, Any]:
        CountingClient.registers += 1
        return super().register(capability)


def test_register_gives_up_at_once_on_an_untrusted_certificate(tmp_path: Path) -> None:
    with tls_server(tmp_path) as (url, _, _):
        worker = Worker(
            WorkerConfig(url=url, join_token="j", workdir=tmp_path / "w"),
            client_factory=lambda token: CountingClient(url, token),
        )
        with pytest.raises(UntrustedCertificate):
            worker.run()
    assert CountingClient.registers == 1  # one try, no retries
    assert worker.worker_id is None


def test_register_keeps_retrying_an_unreachable_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tls_server(tmp_path) as (url, _, _):
        pass  # nothing listens there any more
    worker = Worker(WorkerConfig(url=url, join_token="j", workdir=tmp_path / "w"))
    worker.reporter.initial_backoff_s = 0.01
    tries = []
    real_register = Client.register

    def counted(client: Client, capability: dict[str, object]) -> object:
        tries.append(1)
        if len(tries) == 3:
            worker.stop.set()
        return real_register(client, capability)

    monkeypatch.setattr(Client, "register", counted)
    assert worker.register() is False  # stopped while still retrying, not raised
    assert len(tries) == 3


def test_join_exits_1_with_one_line_naming_ca_cert(tmp_path: Path) -> None:
    token = tmp_path / "host.token"
    token.write_text("a-join-token\n")
    with tls_server(tmp_path) as (url, _, _):
        result = CliRunner().invoke(
            app,
            [
                "join",
                url,
                "--token-file",
                str(token),
                "--workdir",
                str(tmp_path / "w"),
                "--state-dir",
                str(tmp_path / "state"),
            ],
            env={"TRAINFLEET_CA_CERT": ""},
        )
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "certificate is not trusted" in errors[0] and "--ca-cert PATH" in errors[0]
    assert "Traceback" not in result.output
