"""The worker as a systemd service: ``trainfleet join URL ... --install-service``.

A worker started by hand dies with its terminal and does not come back after a reboot. This
module renders a systemd unit that runs the same ``trainfleet join`` with the same flags, and
installs or removes it:

- ``/etc/systemd/system/trainfleet-worker[-NAME].service`` (mode 0644): ``ExecStart`` is
  this installation's ``trainfleet`` (the script beside ``sys.executable``, else
  ``sys.executable -P -m trainfleet.cli.main``) with every join flag the operator gave, paths
  made absolute, and never a secret;
- ``/etc/trainfleet/worker[-NAME].env`` (mode 0600, directory 0700, owned by root): the join
  token as ``TRAINFLEET_JOIN_TOKEN``, read by systemd itself (as root) through
  ``EnvironmentFile=``, so the service user need not be able to read it and ``ps`` never shows
  it.

How the unit stops and restarts follows the daemon (:mod:`trainfleet.worker.daemon`):

- ``KillMode=mixed``: a stop sends SIGTERM to the worker alone, which stops its job through
  the shepherd (SIGTERM, SIGKILL after the job's grace), hands it back and deregisters; only
  after ``TimeoutStopSec`` does systemd SIGKILL everything left in the control group, so no
  job process outlives the service. (With the default ``control-group`` every job process
  would get SIGTERM at the same moment as the worker, and a job dying first would be reported
  failed instead of handed back.)
- ``Restart=on-failure`` every ``RestartSec``, at most ``START_LIMIT_BURST`` starts in
  ``START_LIMIT_INTERVAL_S``: the daemon already retries an unreachable coordinator itself,
  with jittered exponential backoff, so it exits non-zero only for what retrying does not
  fix quickly (a refused join token, an untrusted certificate) or a crash; a bounded number of
  restarts covers the crash without knocking on the coordinator with a revoked token forever.
  Exit status 2 (a usage error) is never restarted. (``RestartSteps=`` would give an
  exponential restart delay, but only systemd >= 254 knows it.)

The service user (``User=``) defaults to the user who ran ``sudo`` (``SUDO_USER``), else root:
the worker runs whatever command jobs the coordinator hands it, and should not gain root
only because installing a unit needs it. Its state directory
``/var/lib/trainfleet/worker[-NAME]`` (``StateDirectory=``, mode 0700) is created and owned by
that user, and is the worker's ``--workdir`` unless the operator gave one.

Installing refuses before writing anything where it cannot finish (not Linux, not root, no
running systemd, no ``systemctl``, an unknown user, a unit already there without ``force``):
a half-done install would leave a copy of the token in /etc that nothing uses.
``render_unit``/``render_env_file`` are pure, so ``--print-service`` shows the files
anywhere. The paths and the root check are overridable through ``TRAINFLEET_SYSTEMD_DIR``,
``TRAINFLEET_ETC_DIR``, ``TRAINFLEET_SYSTEMD_RUN_DIR`` and ``TRAINFLEET_SERVICE_EUID``, for
tests (with a fake ``systemctl`` on ``PATH``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from trainfleet import __version__, env
from trainfleet.errors import TrainfleetError

# Test hooks: where the unit and env file go, sd_booted()'s marker, the euid to assume.
SYSTEMD_DIR_VAR = "TRAINFLEET_SYSTEMD_DIR"
ETC_DIR_VAR = "TRAINFLEET_ETC_DIR"
SYSTEMD_RUN_DIR_VAR = "TRAINFLEET_SYSTEMD_RUN_DIR"
EUID_VAR = "TRAINFLEET_SERVICE_EUID"

DEFAULT_SYSTEMD_DIR = Path("/etc/systemd/system")
DEFAULT_ETC_DIR = Path("/etc/trainfleet")
DEFAULT_SYSTEMD_RUN_DIR = Path("/run/systemd/system")  # exists iff systemd is PID 1
STATE_ROOT = Path("/var/lib")  # where StateDirectory= puts a system unit's state
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Worker settings read from the environment rather than flags: carried when set.
CARRIED_ENV = (env.MIN_FREE_BYTES, env.FEATURE_HOST, env.FEATURE_ADVERTISE)

RESTART_S = 10
START_LIMIT_INTERVAL_S = 600
START_LIMIT_BURST = 5
USAGE_EXIT = 2  # the CLI's exit status for a bad flag: restarting cannot fix it
# The job's grace (attempt.TERM_GRACE_S, 10 s) + the wait for the shepherd (5 s) + handing
# the job back and deregistering, with room to spare; then SIGKILL for the whole group.
STOP_TIMEOUT_S = 45

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]+")
_PLAIN = re.compile(r"[A-Za-z0-9_@+=:,./-]+")  # a word systemd reads back as it is


class ServiceError(TrainfleetError):
    """Installing or removing the service is refused or failed; the message says why."""


# -- quoting (systemd.syntax(7), systemd.service(5) "Command lines") -----------------------
def systemd_quote(word: str, *, dollar: bool = True) -> str:
    """``word`` as one word of a systemd setting that is split and unquoted (``ExecStart=``,
    ``Environment=``): systemd's rules, not the shell's.

    Specifiers are expanded on the whole line first (``%`` -> ``%%``), then the line is split
    into words with C-style escapes inside double quotes (``\\`` and ``"`` escaped, control
    characters as ``\\n``, ``\\t``, ``\\xHH``), then ``ExecStart=`` expands ``$VAR`` in each
    word (``$`` -> ``$$``; ``dollar=False`` for ``Environment=``, which does not). A lone
    ``;`` is a command separator unless quoted: anything outside ``_PLAIN`` is quoted.
    """
    if _PLAIN.fullmatch(word):
        return word
    out = []
    for ch in word:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch == "%":
            out.append("%%")
        elif ch == "$" and dollar:
            out.append("$$")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def exec_line(argv: Sequence[str]) -> str:
    """An ``ExecStart=`` value. The executable (the first word) is not ``$``-expanded, and
    systemd refuses one whose path holds a quote, a backslash or a control character
    ("Executable name contains special characters"): refused here first, by name."""
    exe, *args = argv
    if re.search(r"[\"'\\\x00-\x1f\x7f]", exe):
        raise ServiceError(
            f"systemd cannot start an executable whose path holds quotes, backslashes or"
            f" control characters: {exe!r} (install trainfleet under another path)"
        )
    return " ".join([systemd_quote(exe, dollar=False), *(systemd_quote(a) for a in args)])


def _path_value(path: Path) -> str:
    """A path for a setting that takes the rest of the line (no unquoting, specifiers only)."""
    text = str(path)
    if any(ord(ch) < 0x20 for ch in text):
        raise ServiceError(f"a path with a control character cannot go in a unit: {text!r}")
    return text.replace("%", "%%")


def _line_value(text: str) -> str:
    """Free text for a setting that takes the rest of the line (``Description=``): control
    characters and backslashes become ``?``, so it cannot end the line early nor, with a
    trailing backslash, continue it onto the next setting."""
    return "".join(ch if ch.isprintable() and ch != "\\" else "?" for ch in text)


def _env_file_value(value: str) -> str:
    """A double-quoted value of an ``EnvironmentFile=`` line (POSIX shell double-quote escapes:
    ``\\``, ``"``, ``$`` and backquote)."""
    return '"' + re.sub(r'([\\"$`])', r"\\\1", value) + '"'


# -- the spec and what it renders to ----------------------------------------------------
def default_launcher() -> tuple[str, ...]:
    """How the unit starts this installation's ``trainfleet``: the console script beside the
    interpreter (a virtualenv's or pip's bin directory) where there is one, else the module
    through the interpreter. ``-P``: the working directory, which jobs write to, is not put on
    ``sys.path``."""
    python = os.path.abspath(sys.executable)
    script = Path(python).parent / "trainfleet"
    if script.is_file() and os.access(script, os.X_OK):
        return (str(script),)
    return (python, "-P", "-m", "trainfleet.cli.main")


def default_user() -> str:
    """``SUDO_USER`` (who ran ``sudo trainfleet join ...``) unless that is root; else root."""
    user = os.environ.get("SUDO_USER", "")
    return user if user and user != "root" else "root"


def stem(name: str | None) -> str:
    """``worker`` or ``worker-NAME``: the unit is ``trainfleet-STEM.service``, the token is in
    ``STEM.env``, the state in ``/var/lib/trainfleet/STEM``."""
    return "worker" if name is None else f"worker-{name}"


def unit_name(name: str | None) -> str:
    return f"trainfleet-{stem(name)}.service"


def check_name(name: str | None) -> None:
    if name is not None and not _NAME.fullmatch(name):
        raise ServiceError(
            f"invalid --service-name {name!r}: letters, digits, '_', '.' and '-' (up to 64,"
            " starting with a letter or digit)"
        )


def _has_userinfo(url: str) -> bool:
    try:
        parts = urlsplit(url.strip())
    except ValueError:  # not a URL at all: the worker refuses it when it starts
        return False
    return "@" in parts.netloc


@dataclass(frozen=True)
class ServiceSpec:
    """What the unit and its environment file say: a pure value, rendered anywhere."""

    join_args: tuple[str, ...]  # after ``join``: the URL, then the flags the operator gave
    token: str  # the join token: into the env file only
    name: str | None = None  # --service-name: trainfleet-worker-NAME.service
    user: str = "root"  # User= (jobs run as this user)
    launcher: tuple[str, ...] = field(default_factory=default_launcher)
    environment: tuple[tuple[str, str], ...] = ()  # extra Environment= (CARRIED_ENV)

    def __post_init__(self) -> None:
        check_name(self.name)
        if not _USER.fullmatch(self.user):
            raise ServiceError(f"invalid --service-user {self.user!r}")
        if not self.token or any(ch in self.token for ch in "\n\r\0"):
            raise ServiceError("the join token is empty or holds a line break")
        if self.join_args and any(_has_userinfo(u) for u in self.join_args[0].split(",")):
            raise ServiceError(
                "the coordinator URL carries a user name or password, and the unit file is"
                " readable by every user: give the URL without them (the join token is"
                " what authenticates the worker)"
            )

    @property
    def stem(self) -> str:
        return stem(self.name)

    @property
    def unit_name(self) -> str:
        return unit_name(self.name)

    @property
    def state_dir(self) -> Path:
        """``/var/lib/trainfleet/worker[-NAME]``: systemd creates it, owned by ``user``."""
        return STATE_ROOT / "trainfleet" / self.stem

    @property
    def workdir(self) -> str:
        """The operator's ``--workdir``, else the state directory."""
        args = self.join_args
        return args[args.index("--workdir") + 1] if "--workdir" in args else str(self.state_dir)

    def argv(self) -> list[str]:
        """The worker's command line (``--workdir`` defaults to the state directory)."""
        args = [*self.launcher, "join", *self.join_args]
        if "--workdir" not in self.join_args:
            args += ["--workdir", self.workdir]
        return args


def render_unit(spec: ServiceSpec, env_file: Path) -> str:
    """The unit file's text (pure: ``env_file`` is where the token is)."""
    url = spec.join_args[0] if spec.join_args else ""
    what = "trainfleet worker" + ("" if spec.name is None else f" {spec.name}")
    description = f"{what} for {url}".replace("%", "%%")
    path = ":".join(dict.fromkeys([str(Path(spec.launcher[0]).parent), *SYSTEMD_PATH.split(":")]))
    environment = [("PATH", path), ("PYTHONUNBUFFERED", "1"), *spec.environment]
    lines = [
        f"# Written by `trainfleet join --install-service` (trainfleet {__version__}); remove it",
        "# with `trainfleet join --uninstall-service"
        + ("" if spec.name is None else f" --service-name {spec.name}")
        + "`. The join token is in",
        f"# {env_file} (root only), never in this file.",
        "[Unit]",
        f"Description={_line_value(description)}",
        "Wants=network-online.target",
        "After=network-online.target",
        f"StartLimitIntervalSec={START_LIMIT_INTERVAL_S}",
        f"StartLimitBurst={START_LIMIT_BURST}",
        "",
        "[Service]",
        "Type=exec",
        f"User={spec.user}",
        f"ExecStart={exec_line(spec.argv())}",
        f"EnvironmentFile={_path_value(env_file)}",
        *(f"Environment={systemd_quote(f'{k}={v}', dollar=False)}" for k, v in environment),
        f"StateDirectory=trainfleet/{spec.stem}",
        "StateDirectoryMode=0700",
        f"WorkingDirectory={_path_value(spec.state_dir)}",
        "Restart=on-failure",
        f"RestartSec={RESTART_S}s",
        f"RestartPreventExitStatus={USAGE_EXIT}",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={STOP_TIMEOUT_S}s",
        "StandardOutput=journal",
        "StandardError=journal",
        f"SyslogIdentifier=trainfleet-{spec.stem}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def render_env_file(spec: ServiceSpec, *, redact: bool = False) -> str:
    """The environment file's text; ``redact`` hides the token (for ``--print-service``)."""
    value = "<redacted>" if redact else _env_file_value(spec.token)
    return (
        f"# The join token of {spec.unit_name}, read by systemd (as root) for the worker.\n"
        f"{env.JOIN_TOKEN}={value}\n"
    )


# -- installing ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Host:
    """Where this machine keeps units and secrets, and what it is: the install's inputs."""

    systemd_dir: Path = DEFAULT_SYSTEMD_DIR
    etc_dir: Path = DEFAULT_ETC_DIR
    systemd_run_dir: Path = DEFAULT_SYSTEMD_RUN_DIR
    euid: int = 0
    platform: str = "linux"
    systemctl: str | None = None

    @classmethod
    def current(cls) -> Host:
        """This machine, with the test hooks' overrides applied."""
        euid = os.environ.get(EUID_VAR, "").strip()
        return cls(
            systemd_dir=Path(os.environ.get(SYSTEMD_DIR_VAR) or DEFAULT_SYSTEMD_DIR),
            etc_dir=Path(os.environ.get(ETC_DIR_VAR) or DEFAULT_ETC_DIR),
            systemd_run_dir=Path(os.environ.get(SYSTEMD_RUN_DIR_VAR) or DEFAULT_SYSTEMD_RUN_DIR),
            euid=int(euid) if euid.isdigit() else os.geteuid(),
            platform=sys.platform,
            systemctl=shutil.which("systemctl"),
        )

    def unit_path(self, name: str | None) -> Path:
        return self.systemd_dir / unit_name(name)

    def env_path(self, name: str | None) -> Path:
        return self.etc_dir / f"{stem(name)}.env"

    def check(self, action: str) -> str:
        """Refuse where ``action`` cannot finish; returns the ``systemctl`` to run."""
        if not self.platform.startswith("linux"):
            raise ServiceError(f"{action} needs Linux with systemd (this is {self.platform})")
        if self.euid != 0:
            raise ServiceError(f"{action} writes to {self.systemd_dir}: run it with sudo")
        if not self.systemd_run_dir.is_dir():
            raise ServiceError(
                f"systemd is not running on this machine (no {self.systemd_run_dir}): nothing"
                " written; --print-service shows the unit to install by hand"
            )
        if self.systemctl is None:
            raise ServiceError("no systemctl on PATH: nothing written")
        return self.systemctl


@dataclass(frozen=True)
class Installed:
    unit: str
    unit_path: Path
    env_path: Path
    replaced: bool  # an existing unit was overwritten (--force) and restarted


def install(spec: ServiceSpec, host: Host, *, force: bool = False) -> Installed:
    """Write the unit and its env file, reload systemd, enable and start the service."""
    systemctl = host.check("--install-service")
    try:
        pwd.getpwnam(spec.user)
    except KeyError:
        raise ServiceError(f"no user {spec.user!r} on this machine (--service-user)") from None
    unit_path, env_path = host.unit_path(spec.name), host.env_path(spec.name)
    replaced = unit_path.exists()
    if replaced and not force:
        raise ServiceError(
            f"{unit_path} already exists: --force replaces it (and restarts the service),"
            f" --uninstall-service removes it"
        )
    if not host.systemd_dir.is_dir():
        raise ServiceError(f"no {host.systemd_dir} directory")
    unit_text = render_unit(spec, env_path)  # may refuse: before the token is written
    host.etc_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    host.etc_dir.chmod(0o700)
    write_atomic(env_path, render_env_file(spec), 0o600)
    write_atomic(unit_path, unit_text, 0o644)
    _run(systemctl, "daemon-reload")
    if replaced:
        _run(systemctl, "enable", spec.unit_name)
        _run(systemctl, "restart", spec.unit_name)
    else:
        _run(systemctl, "enable", "--now", spec.unit_name)
    return Installed(spec.unit_name, unit_path, env_path, replaced)


@dataclass(frozen=True)
class Removed:
    unit: str
    removed: list[Path]
    state_dir: Path  # kept: job outputs and the data cache


def uninstall(name: str | None, host: Host) -> Removed:
    """Stop and disable the service, remove its unit and env file, reload systemd."""
    check_name(name)
    systemctl = host.check("--uninstall-service")
    unit = unit_name(name)
    unit_path, env_path = host.unit_path(name), host.env_path(name)
    if not unit_path.exists() and not env_path.exists():
        raise ServiceError(f"{unit} is not installed (no {unit_path})")
    if unit_path.exists():
        _run(systemctl, "disable", "--now", unit)
    removed = []
    for path in (unit_path, env_path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    _run(systemctl, "daemon-reload")
    # A unit that had failed stays listed as failed until reset; it may not be loaded at all.
    subprocess.run([systemctl, "reset-failed", unit], capture_output=True, check=False)
    return Removed(unit, removed, STATE_ROOT / "trainfleet" / stem(name))


def write_atomic(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` with ``mode`` from the first byte (never readable by others
    meanwhile), then rename over the old file: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        with os.fdopen(
            os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w", encoding="utf-8"
        ) as out:
            os.fchmod(out.fileno(), mode)  # whatever the umask
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _run(systemctl: str, *args: str) -> None:
    proc = subprocess.run([systemctl, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip()
        raise ServiceError(
            f"systemctl {' '.join(args)} failed (exit {proc.returncode})"
            + (f": {said}" if said else "")
        )


def flag_args(options: Sequence[tuple[str, object]]) -> list[str]:
    """``--flag value`` words from (flag, value) pairs: True is the bare flag, False and None
    are left out, paths are made absolute (the unit runs elsewhere)."""
    words: list[str] = []
    for flag, value in options:
        if value is None or value is False:
            continue
        if value is True:
            words.append(flag)
        elif isinstance(value, Path):
            words += [flag, str(value.absolute())]
        else:
            words += [flag, str(value)]
    return words


__all__ = [
    "Host",
    "Installed",
    "Removed",
    "ServiceError",
    "ServiceSpec",
    "default_launcher",
    "default_user",
    "exec_line",
    "flag_args",
    "install",
    "render_env_file",
    "render_unit",
    "systemd_quote",
    "uninstall",
    "unit_name",
]
