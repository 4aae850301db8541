"""A throwaway PostgreSQL server for the tests that share one database between tuner processes.

One implementation, used two ways:
- `tests/run.sh` (through `.ci/postgres.sh`) runs `python tests/postgres.py start DIR` before the
  suite, exports the URL it prints as KERNELHUB_TEST_POSTGRES, and runs `stop DIR` on exit;
- the `postgres_server` fixture takes KERNELHUB_TEST_POSTGRES when it is set, else starts its own
  cluster for the session when the server binaries are installed, else skips saying what is missing.
Every test gets a database of its own (`postgres_url`), dropped afterwards.

The cluster listens on loopback only, trusts every local connection and skips fsync: it holds
nothing but test data and lives as long as the run.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

SERVER_ENV = "KERNELHUB_TEST_POSTGRES"
SUPERUSER = "kernelhub"
# PostgreSQL refuses to run as root; root runs it as this user (Debian's package creates it).
SERVER_ACCOUNT = "postgres"


def server_binaries() -> Path | None:
    """The directory holding `initdb` and `pg_ctl`: on PATH, or Debian's newest /usr/lib/postgresql/<v>/bin."""
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl and shutil.which("initdb"):
        return Path(pg_ctl).parent
    debian = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl") if (p.parent / "initdb").exists()]
    versions = [b for b in debian if b.parent.name.isdigit()]
    return max(versions, key=lambda b: int(b.parent.name)) if versions else None


def why_unavailable() -> str | None:
    """None when `start` can work on this machine, else what is missing."""
    if server_binaries() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root, and no runuser to start PostgreSQL as another user"
        try:
            pwd.getpwnam(SERVER_ACCOUNT)
        except KeyError:
            return f"running as root, and no {SERVER_ACCOUNT!r} user to start PostgreSQL as"
    return None


def _as_server_account(argv: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_ACCOUNT, "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(_as_server_account(argv), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-2000:]
        raise RuntimeError(f"cannot {what} ({' '.join(argv[:1])} exited {result.returncode}):\n{output}")


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(directory: Path) -> str:
    """Create a cluster under `directory`, start it on a free loopback port, return its URL.

    The URL names the `postgres` database and a superuser, who may create more databases.
    """
    missing = why_unavailable()
    if missing:
        raise RuntimeError(f"cannot start PostgreSQL: {missing}")
    bindir = server_binaries()
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        account = pwd.getpwnam(SERVER_ACCOUNT)
        os.chown(directory, account.pw_uid, account.pw_gid)
        directory.chmod(0o755)  # the account must reach its data directory
    data = directory / "data"
    _run([str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust", "--no-sync",
          "--no-locale", "-E", "UTF8"], "create a PostgreSQL cluster")
    port = _free_loopback_port()
    server_options = f"-c listen_addresses=127.0.0.1 -p {port} -k {directory} -c fsync=off -c max_connections=200"
    _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(directory / "server.log"), "-w", "-t", "60",
          "-o", server_options, "start"], f"start PostgreSQL (log: {directory / 'server.log'})")
    return f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"


def stop(directory: Path) -> None:
    """Stop the cluster `start` made under `directory` (if it runs) and delete it."""
    bindir = server_binaries()
    data = directory / "data"
    if bindir is not None and (data / "postmaster.pid").exists():
        subprocess.run(_as_server_account([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                                           "stop"]), capture_output=True, timeout=120)
    shutil.rmtree(directory, ignore_errors=True)


# -- fixtures (imported by conftest.py) ------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server():
    """URL of a PostgreSQL server whose user may create databases, for the whole session."""
    if os.environ.get(SERVER_ENV, "").strip():
        yield os.environ[SERVER_ENV].strip()
        return
    missing = why_unavailable()
    if missing:
        pytest.skip(f"PostgreSQL tests need a server: {missing}; set {SERVER_ENV} to a server URL "
                    "or run `bash tests/run.sh`, which installs one")
    directory = Path(tempfile.mkdtemp(prefix="kernelhub-postgres-"))
    try:
        yield start(directory)
    finally:
        stop(directory)


@pytest.fixture
def postgres_url(postgres_server):
    """URL of a fresh, empty database on that server, dropped after the test."""
    psycopg = pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg: pip install -e '.[test]'")
    from sqlalchemy.engine import make_url

    server = make_url(postgres_server)
    name = f"kernelhub_test_{uuid.uuid4().hex[:12]}"
    admin = dict(host=server.host, port=server.port, user=server.username, password=server.password,
                 dbname=server.database or "postgres")
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield server.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str]) -> int:
    """`start DIR` prints the server's URL; `stop DIR`; `binaries` prints where they are (exit 1: none)."""
    command = argv[0] if argv else ""
    if command == "binaries" and len(argv) == 1:
        found = server_binaries()
        print(found or why_unavailable(), file=sys.stdout if found else sys.stderr)
        return 0 if found else 1
    if command in ("start", "stop") and len(argv) == 2:
        if command == "stop":
            stop(Path(argv[1]))
            return 0
        try:
            print(start(Path(argv[1])))
        except RuntimeError as exc:
            print(f"tests/postgres.py: {exc}", file=sys.stderr)
            return 1
        return 0
    print("usage: python tests/postgres.py start DIR | stop DIR | binaries", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
