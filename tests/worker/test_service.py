"""The worker's systemd unit: rendered (every flag, no secret, systemd's quoting), installed
and removed in temporary directories with a fake ``systemctl`` (a real executable that
records its calls), and every refusal. ``systemd-analyze verify`` checks the rendered unit
where it is installed. Starting the unit under a running systemd is in
``tests/e2e/test_service_e2e.py``."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainfleet.worker.service import (
    Host,
    ServiceError,
    ServiceSpec,
    exec_line,
    flag_args,
    install,
    render_env_file,
    render_unit,
    systemd_quote,
    uninstall,
    write_atomic,
)

TOKEN = "s3cr3t-join-TOKEN"
LAUNCHER = ("/opt/venv/bin/trainfleet",)

FAKE_SYSTEMCTL = """#!/bin/sh
# A stand-in for systemctl: records each call, fails the verb named in FAKE_SYSTEMCTL_FAIL.
printf '%s\\n' "$*" >> "$FAKE_SYSTEMCTL_LOG"
if [ -n "$FAKE_SYSTEMCTL_FAIL" ] && [ "$1" = "$FAKE_SYSTEMCTL_FAIL" ]; then
    echo "Failed to $1 unit: Access denied" >&2
    exit 4
fi
exit 0
"""


def fake_systemctl(bin_dir: Path, log: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Write the fake ``systemctl`` into ``bin_dir``; its calls go to ``log``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "systemctl"
    exe.write_text(FAKE_SYSTEMCTL)
    exe.chmod(0o755)
    monkeypatch.setenv("FAKE_SYSTEMCTL_LOG", str(log))
    monkeypatch.delenv("FAKE_SYSTEMCTL_FAIL", raising=False)
    return exe


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    """A Linux host running systemd, as root, whose /etc and /run are under ``tmp_path``."""
    (tmp_path / "etc" / "systemd" / "system").mkdir(parents=True)
    (tmp_path / "run" / "systemd" / "system").mkdir(parents=True)
    exe = fake_systemctl(tmp_path / "bin", tmp_path / "systemctl.log", monkeypatch)
    return Host(
        systemd_dir=tmp_path / "etc" / "systemd" / "system",
        etc_dir=tmp_path / "etc" / "trainfleet",
        systemd_run_dir=tmp_path / "run" / "systemd" / "system",
        euid=0,
        platform="linux",
        systemctl=str(exe),
    )


def spec(*flags: str, name: str | None = None, token: str = TOKEN) -> ServiceSpec:
    return ServiceSpec(
        join_args=("http://10.0.0.5:8470", *flags),
        token=token,
        name=name,
        user="root",
        launcher=LAUNCHER,
    )


def settings(unit: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit, by key (comments and sections left out). Lines end at
    ``\\n`` only, as systemd reads them (not at U+2028 or U+0085, as ``splitlines`` would)."""
    out: dict[str, list[str]] = {}
    for line in unit.split("\n"):
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


# -- a reference reader of systemd's quoting (systemd.syntax(7), systemd.service(5)) -------
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r", "s": " "}


def systemd_words(line: str, *, dollar: bool = True) -> list[str]:
    """Read an ``ExecStart=`` value back as systemd does: specifiers (only ``%%`` here), then
    words (double quotes with C escapes), then ``$$`` -> ``$`` in each word but the first."""
    assert not re.search(r"%[^%]", line.replace("%%", "")), f"a bare specifier in {line!r}"
    text = line.replace("%%", "%")
    words: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == " ":
            i += 1
            continue
        word = []
        if text[i] == '"':
            i += 1
            while text[i] != '"':
                if text[i] == "\\":
                    nxt = text[i + 1]
                    if nxt == "x":
                        word.append(chr(int(text[i + 2 : i + 4], 16)))
                        i += 4
                        continue
                    word.append(_ESCAPES[nxt])
                    i += 2
                    continue
                word.append(text[i])
                i += 1
            i += 1
            assert i == len(text) or text[i] == " ", "a quoted word ends at a space"
        else:
            while i < len(text) and text[i] != " ":
                assert text[i] not in "\\\"'$;", f"unquoted special character in {line!r}"
                word.append(text[i])
                i += 1
        words.append("".join(word))
    if dollar:
        words[1:] = [
            w.replace("$$", "\0").replace("$", "<VAR>").replace("\0", "$") for w in words[1:]
        ]
    return words


@pytest.mark.parametrize(
    ("word", "quoted"),
    [
        ("plain", "plain"),
        ("/abs/path-1.2_x", "/abs/path-1.2_x"),
        ("http://h:8470,http://g:8470", "http://h:8470,http://g:8470"),
        ("", '""'),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("100%", '"100%%"'),
        ("$HOME", '"$$HOME"'),
        ("back\\slash", '"back\\\\slash"'),
        (";", '";"'),
        ("it's", '"it\'s"'),
        ("line\nbreak\ttab", '"line\\nbreak\\ttab"'),
        ("bell\x07", '"bell\\x07"'),
    ],
)
def test_systemd_quote(word: str, quoted: str) -> None:
    assert systemd_quote(word) == quoted
    assert systemd_words(f"/bin/x {quoted}") == ["/bin/x", word]


def test_environment_assignments_keep_dollars() -> None:
    # Environment= does no $-expansion: a doubled $ would reach the worker doubled.
    assert systemd_quote("A=$x y", dollar=False) == '"A=$x y"'


@given(st.text(alphabet=st.characters(blacklist_characters="\0"), max_size=40))
def test_any_argument_reads_back_as_itself(word: str) -> None:
    assert systemd_words(exec_line(["/bin/x", word])) == ["/bin/x", word]


def test_the_executable_is_quoted_without_dollar_doubling_and_bad_paths_are_refused() -> None:
    assert exec_line(["/opt/my venv/$x%/trainfleet", "$y"]) == (
        '"/opt/my venv/$x%%/trainfleet" "$$y"'
    )
    for bad in ['/opt/a"b/trainfleet', "/opt/a'b/trainfleet", "/opt/a\\b/trainfleet"]:
        with pytest.raises(ServiceError, match="quotes, backslashes"):
            exec_line([bad, "join"])


# -- rendering ----------------------------------------------------------------------------
def test_the_unit_carries_every_flag_and_never_the_token() -> None:
    flags = ("--host", "gpu box", "--threads", "4", "--verify-routing", "--max-mbps", "5.0")
    s = spec(*flags, "--ca-cert", "/etc/ssl/my ca.pem")
    unit = render_unit(s, Path("/etc/trainfleet/worker.env"))
    exec_start = settings(unit)["ExecStart"]
    assert len(exec_start) == 1
    assert systemd_words(exec_start[0]) == [
        *LAUNCHER,
        "join",
        "http://10.0.0.5:8470",
        *flags,
        "--ca-cert",
        "/etc/ssl/my ca.pem",
        "--workdir",
        "/var/lib/trainfleet/worker",
    ]
    assert TOKEN not in unit
    assert settings(unit)["EnvironmentFile"] == ["/etc/trainfleet/worker.env"]
    assert f'TRAINFLEET_JOIN_TOKEN="{TOKEN}"' in render_env_file(s).splitlines()
    assert TOKEN not in render_env_file(s, redact=True)


def test_the_unit_stops_gracefully_restarts_on_failure_and_waits_for_the_network() -> None:
    got = settings(render_unit(spec(name="gpu0"), Path("/etc/trainfleet/worker-gpu0.env")))
    assert got["KillMode"] == ["mixed"]  # SIGTERM to the worker only, SIGKILL the rest later
    assert got["TimeoutStopSec"] == ["45s"]
    assert got["Restart"] == ["on-failure"]
    assert got["RestartPreventExitStatus"] == ["2"]
    assert got["After"] == ["network-online.target"]
    assert got["Wants"] == ["network-online.target"]
    assert got["WantedBy"] == ["multi-user.target"]
    assert got["User"] == ["root"]
    assert got["StateDirectory"] == ["trainfleet/worker-gpu0"]
    assert got["WorkingDirectory"] == ["/var/lib/trainfleet/worker-gpu0"]
    assert got["StandardOutput"] == ["journal"]
    assert got["SyslogIdentifier"] == ["trainfleet-worker-gpu0"]
    assert "Environment" in got and any(
        v.startswith("PATH=/opt/venv/bin:") for v in got["Environment"]
    )


def test_a_given_workdir_replaces_the_state_directory() -> None:
    s = spec("--workdir", "/data/worker")
    words = systemd_words(settings(render_unit(s, Path("/e.env")))["ExecStart"][0])
    assert words.count("--workdir") == 1
    assert words[words.index("--workdir") + 1] == "/data/worker"
    assert s.workdir == "/data/worker"


def test_percent_in_the_url_and_paths_is_escaped_everywhere() -> None:
    s = ServiceSpec(
        join_args=("http://h:1/a%20b",), token=TOKEN, user="root", launcher=("/o/100%/tf",)
    )
    unit = render_unit(s, Path("/etc/100%/w.env"))
    got = settings(unit)
    assert got["Description"] == ["trainfleet worker for http://h:1/a%%20b"]
    assert got["EnvironmentFile"] == ["/etc/100%%/w.env"]
    assert systemd_words(got["ExecStart"][0])[:3] == ["/o/100%/tf", "join", "http://h:1/a%20b"]


def test_tokens_are_escaped_in_the_env_file_and_line_breaks_refused() -> None:
    text = render_env_file(spec(token='a"b$c`d\\e'))
    assert 'TRAINFLEET_JOIN_TOKEN="a\\"b\\$c\\`d\\\\e"' in text.splitlines()
    with pytest.raises(ServiceError, match="line break"):
        spec(token="a\nb")


@pytest.mark.parametrize(
    "url",
    [
        "http://h:1/\\",  # a trailing backslash continues a unit line onto the next
        "http://h:1/\\\\",
        "http://h:1/\nExecStartPre=/bin/sh -c evil",
        "http://h:1/\rExecStartPre=/bin/sh",  # systemd ends a line at \r as well
        "http://h:1/\u2028x\x85y",
        "http://h:1/ $HOME ; %n",
    ],
)
def test_a_join_url_cannot_end_break_or_inject_a_line_of_the_unit(url: str) -> None:
    s = ServiceSpec(join_args=(url, "--host", url), token=TOKEN, user="root", launcher=LAUNCHER)
    unit = render_unit(s, Path("/etc/trainfleet/worker.env"))
    lines = unit.split("\n")
    assert not any(line.endswith("\\") for line in lines)  # no continuation line
    assert "\r" not in unit
    got = settings(unit)
    assert got["Wants"] == ["network-online.target"]  # the line after Description= survives
    assert "ExecStartPre" not in got and len(got["ExecStart"]) == 1
    assert systemd_words(got["ExecStart"][0])[2:5] == [url, "--host", url]
    assert got["Description"][0].startswith("trainfleet worker for http://h:1/")


@pytest.mark.parametrize(
    "url", ["http://user:secret@h:1", "https://h:2,http://u:p@h:1/x", "http://token@h:1"]
)
def test_a_url_with_a_user_or_password_is_refused(url: str) -> None:
    # the unit file is world-readable: a password in it would be every user's
    with pytest.raises(ServiceError, match="user name or password"):
        ServiceSpec(join_args=(url,), token=TOKEN, user="root", launcher=LAUNCHER)
    assert ServiceSpec(join_args=("http://h:1/a@b",), token=TOKEN, user="root", launcher=LAUNCHER)


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "x" * 65, "ä"])
def test_bad_service_names_are_refused(name: str) -> None:
    with pytest.raises(ServiceError, match="--service-name"):
        spec(name=name)


def test_flag_args() -> None:
    got = flag_args(
        [("--verify-routing", True), ("--host", None), ("--max-jobs", 3), ("--x", False)]
    )
    assert got == ["--verify-routing", "--max-jobs", "3"]
    assert flag_args([("--workdir", Path("rel"))]) == ["--workdir", str(Path.cwd() / "rel")]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # The executable lives under a path with a space, a percent and a dollar: verify finds it
    # only if systemd reads the quoting back to the same path.
    bin_dir = tmp_path / "my venv 100% $x" / "bin"
    bin_dir.mkdir(parents=True)
    exe = bin_dir / "trainfleet"
    shutil.copy("/bin/true", exe)
    s = ServiceSpec(
        join_args=("http://127.0.0.1:8470", "--host", 'a "b" $c 10%'),
        token=TOKEN,
        name="verify",
        user="root",
        launcher=(str(exe),),
    )
    unit = tmp_path / s.unit_name
    unit.write_text(render_unit(s, tmp_path / "worker-verify.env"))
    ok = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert s.unit_name not in ok.stderr, ok.stderr  # no complaint about our unit
    # The control: the same unit naming an executable that is not there is refused.
    exe.unlink()
    bad = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert bad.returncode != 0 and "not executable" in bad.stderr


# -- installing ---------------------------------------------------------------------------
def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_writes_both_files_with_their_modes_and_starts_the_unit(host: Host) -> None:
    s = spec("--host", "gpu-1", name="gpu1")
    done = install(s, host)
    assert done.unit_path == host.systemd_dir / "trainfleet-worker-gpu1.service"
    assert done.env_path == host.etc_dir / "worker-gpu1.env"
    assert done.unit_path.read_text() == render_unit(s, done.env_path)
    assert done.env_path.read_text() == render_env_file(s)
    assert (mode(done.unit_path), mode(done.env_path), mode(host.etc_dir)) == (0o644, 0o600, 0o700)
    assert not done.replaced
    assert calls(host.systemd_run_dir.parents[2] / "systemctl.log") == [
        "daemon-reload",
        "enable --now trainfleet-worker-gpu1.service",
    ]
    assert [p.name for p in host.systemd_dir.iterdir()] == [done.unit_path.name]  # no temp file


def test_an_existing_unit_is_refused_unless_forced_then_replaced_and_restarted(
    host: Host,
) -> None:
    log = host.systemd_run_dir.parents[2] / "systemctl.log"
    install(spec("--threads", "1"), host)
    before = host.unit_path(None).read_text()
    with pytest.raises(ServiceError, match="already exists: --force"):
        install(spec("--threads", "2"), host)
    assert host.unit_path(None).read_text() == before
    log.unlink()
    done = install(spec("--threads", "2"), host, force=True)
    assert done.replaced
    assert "--threads 2" in done.unit_path.read_text()
    assert calls(log) == [
        "daemon-reload",
        "enable trainfleet-worker.service",
        "restart trainfleet-worker.service",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"platform": "darwin"}, "needs Linux"),
        ({"euid": 1000}, "run it with sudo"),
        ({"systemctl": None}, "no systemctl on PATH"),
    ],
)
def test_install_refuses_before_writing_anything(
    host: Host, change: dict[str, object], message: str
) -> None:
    from dataclasses import replace

    with pytest.raises(ServiceError, match=message):
        install(spec(), replace(host, **change))  # type: ignore[arg-type]
    assert list(host.systemd_dir.iterdir()) == []
    assert not host.etc_dir.exists()


def test_a_unit_that_cannot_be_rendered_leaves_no_token_behind(host: Host) -> None:
    # an installation under a path systemd cannot start is refused: before the env file
    # (a copy of the token nothing would use) is written, not after
    bad = ServiceSpec(
        join_args=("http://10.0.0.5:8470",),
        token=TOKEN,
        user="root",
        launcher=('/opt/my "venv"/bin/trainfleet',),
    )
    with pytest.raises(ServiceError, match="quotes, backslashes"):
        install(bad, host)
    assert not host.env_path(None).exists()
    assert list(host.systemd_dir.iterdir()) == []


def test_install_refuses_where_systemd_is_not_running(host: Host) -> None:
    host.systemd_run_dir.rmdir()
    with pytest.raises(ServiceError, match=r"systemd is not running .*nothing written"):
        install(spec(), host)
    assert list(host.systemd_dir.iterdir()) == [] and not host.etc_dir.exists()


def test_install_refuses_an_unknown_user(host: Host) -> None:
    s = ServiceSpec(
        join_args=("http://h:1",), token=TOKEN, user="no-such-user-x", launcher=LAUNCHER
    )
    with pytest.raises(ServiceError, match="no user 'no-such-user-x'"):
        install(s, host)
    assert not host.etc_dir.exists()


def test_a_failing_systemctl_is_reported_with_what_it_said(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SYSTEMCTL_FAIL", "enable")
    with pytest.raises(ServiceError, match=r"systemctl enable --now .* failed \(exit 4\): Failed"):
        install(spec(), host)


def test_uninstall_stops_disables_and_removes_both_files(host: Host) -> None:
    log = host.systemd_run_dir.parents[2] / "systemctl.log"
    done = install(spec(name="a"), host)
    install(spec(name="b"), host)  # another worker of the same machine stays
    log.unlink()
    removed = uninstall("a", host)
    assert removed.removed == [done.unit_path, done.env_path]
    assert not done.unit_path.exists() and not done.env_path.exists()
    assert host.unit_path("b").exists() and host.env_path("b").exists()
    assert removed.state_dir == Path("/var/lib/trainfleet/worker-a")
    assert calls(log) == [
        "disable --now trainfleet-worker-a.service",
        "daemon-reload",
        "reset-failed trainfleet-worker-a.service",
    ]
    with pytest.raises(ServiceError, match=r"trainfleet-worker-a\.service is not installed"):
        uninstall("a", host)


def test_uninstall_refuses_without_root(host: Host) -> None:
    from dataclasses import replace

    install(spec(), host)
    with pytest.raises(ServiceError, match="sudo"):
        uninstall(None, replace(host, euid=1000))
    assert host.unit_path(None).exists()


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_write_atomic_sets_the_mode_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "f.env"
    target.write_text("old")
    old = os.umask(umask)
    try:
        write_atomic(target, "new", 0o600)
        write_atomic(tmp_path / "u.service", "unit", 0o644)
    finally:
        os.umask(old)
    assert target.read_text() == "new" and mode(target) == 0o600
    assert mode(tmp_path / "u.service") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.env", "u.service"]
