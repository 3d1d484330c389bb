"""Start a throwaway PostgreSQL server on loopback: for the test suite and the cache benchmark.

>>> server = start_postgres()          # doctest: +SKIP
>>> url = server.create_database("t")  # doctest: +SKIP  'postgresql+psycopg://...@127.0.0.1:PORT/t'
>>> server.stop()                      # doctest: +SKIP

PostgreSQL refuses to run as root, so under root every server command runs as `nobody` (through
runuser, or su) in a temporary directory handed to that user. The server listens on 127.0.0.1 only,
on a free port, with its unix socket inside that directory, and password (scram) authentication on
TCP. Every step has a timeout; a failure raises PostgresStartError with the server log attached.
"""

from __future__ import annotations

import glob
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PostgresServer", "PostgresStartError", "find_pg_bin", "start_postgres"]

_UNPRIVILEGED = "nobody"
_USER = "autoquant"
_STEP_TIMEOUT_S = 90


class PostgresStartError(RuntimeError):
    pass


def find_pg_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: $AUTOQUANT_PG_BIN, PATH, then the
    newest /usr/lib/postgresql/*/bin, /usr/local/pgsql/bin; None if there is none."""
    candidates: list[Path] = []
    if os.environ.get("AUTOQUANT_PG_BIN"):
        candidates.append(Path(os.environ["AUTOQUANT_PG_BIN"]))
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")[-2].split(".")],
                  reverse=True)
    candidates += [Path(p) for p in versions] + [Path("/usr/local/pgsql/bin")]
    for directory in candidates:
        if all(os.access(directory / b, os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def _checked(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"name {name!r}: use letters, digits and _ only")
    return name


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", _UNPRIVILEGED, "--", *argv]
    return ["su", "-s", "/bin/sh", _UNPRIVILEGED, "-c", shlex.join(argv)]


@dataclass
class PostgresServer:
    """A running server; `stop()` shuts it down and removes its directory."""

    bin_dir: Path
    base_dir: Path
    port: int
    password: str
    user: str = _USER
    options: tuple[str, ...] = ()
    _stopped: bool = field(default=False, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "server.log"

    def url(self, database: str = "postgres") -> str:
        return (f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/"
                f"{database}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError as err:
            return f"(no server log: {err})"

    def execute(self, sql: str, database: str = "postgres") -> None:
        """Run one statement as the server's superuser, outside a transaction."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user,
                             password=self.password, dbname=database, autocommit=True,
                             connect_timeout=10) as conn:
            conn.execute(sql)  # type: ignore[arg-type] - names are checked by the callers

    def create_database(self, name: str) -> str:
        """Create database `name` (letters, digits, _) and return its SQLAlchemy URL."""
        self.execute(f'CREATE DATABASE "{_checked(name)}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{_checked(name)}" WITH (FORCE)')

    def create_schema(self, database: str, schema: str) -> str:
        """Create `schema` in `database`; return a URL whose sessions use it as search_path.
        A schema is about 100 times cheaper than a database, which suits one per test."""
        self.execute(f'CREATE SCHEMA "{_checked(schema)}"', database)
        return f"{self.url(database)}?options=-csearch_path%3D{schema}"

    def drop_schema(self, database: str, schema: str) -> None:
        self.execute(f'DROP SCHEMA IF EXISTS "{_checked(schema)}" CASCADE', database)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            subprocess.run(_as_server_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir),
                                            "-m", "fast", "-w", "-t", "30", "stop"]),
                           capture_output=True, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            pass
        self._kill_leftover()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def pause(self) -> None:
        """Shut the server down, keeping its data, as an outage would (see resume)."""
        _run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30",
              "stop"], "pg_ctl stop", self)

    def resume(self) -> None:
        """Start the paused server again on the same port, with the same data."""
        _run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
              "-t", "60", "-o", " ".join([f"-p {self.port}", *self.options]), "start"],
             "pg_ctl start", self)

    def _kill_leftover(self) -> None:
        # The postmaster we started, if pg_ctl could not stop it: its pid is line 1 of this file.
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _run(argv: list[str], what: str, server: PostgresServer) -> None:
    try:
        proc = subprocess.run(_as_server_user(argv), capture_output=True, text=True,
                              timeout=_STEP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        raise PostgresStartError(f"{what} timed out after {_STEP_TIMEOUT_S}s\n"
                                 f"server log:\n{server.log_tail()}") from err
    if proc.returncode != 0:
        raise PostgresStartError(f"{what} failed ({proc.returncode}): {shlex.join(argv)}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}\n"
                                 f"server log:\n{server.log_tail()}")


def _prepare_dir() -> tuple[Path, str]:
    base = Path(tempfile.mkdtemp(prefix="autoquant-pg-"))
    password = secrets.token_hex(12)
    (base / "pwfile").write_text(password + "\n")
    (base / "sock").mkdir()
    if os.geteuid() == 0:  # hand the directory to the unprivileged server user
        import pwd

        user = pwd.getpwnam(_UNPRIVILEGED)
        for path in (base, base / "pwfile", base / "sock"):
            os.chown(path, user.pw_uid, user.pw_gid)
    base.chmod(0o755)
    return base, password


def start_postgres(*, fsync: bool = False, attempts: int = 3) -> PostgresServer:
    """initdb + start a server on a free loopback port. `fsync=False` (tests) trades crash
    safety of this throwaway server for speed; the benchmark passes True for realistic writes."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise PostgresStartError("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on "
                                 "PATH or in /usr/lib/postgresql/*/bin; run "
                                 "scripts/ensure_postgres.sh or set AUTOQUANT_PG_BIN")
    base, password = _prepare_dir()
    server = PostgresServer(bin_dir, base, 0, password)
    try:
        _run([str(bin_dir / "initdb"), "-D", str(server.data_dir), "-U", _USER, "-E", "UTF8",
              "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256",
              f"--pwfile={base / 'pwfile'}", "--no-sync"], "initdb", server)
        options = [f"-k {base / 'sock'}", "-c listen_addresses=127.0.0.1",
                   "-c max_connections=60", "-c shared_buffers=128MB"]
        if not fsync:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        server.options = tuple(options)
        last: PostgresStartError | None = None
        for _ in range(attempts):  # the free port can be taken between probe and bind: retry
            server.port = _free_port()
            try:
                _run([str(bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-l",
                      str(server.log_file), "-w", "-t", "60",
                      "-o", " ".join([f"-p {server.port}", *options]), "start"],
                     "pg_ctl start", server)
                return server
            except PostgresStartError as err:
                last = err
        raise last or PostgresStartError("pg_ctl start failed")
    except BaseException:
        server.stop()
        raise
