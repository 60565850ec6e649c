"""
A throwaway PostgreSQL cluster for tests: ``initdb`` into a fresh temporary
directory, ``pg_ctl`` on a free loopback port, a password user ``kapow``,
and a fresh database for each test that asks (``CREATE DATABASE``), so
that tests never see one another's rows.

The directory is made with ``mkdtemp`` directly under the system temporary
directory: when the tests run as root the cluster runs as the ``postgres``
user (PostgreSQL refuses root), which could not reach pytest's ``tmp_path``.

Use it from any test module (tests/unit, tests/e2e)::

    from tests.support.postgres import postgres  # noqa: F401  (registers the fixture)

    def test_something(postgres: Postgres) -> None:
        uri = postgres.new_database()

The session's one cluster can be stopped and started again
(:meth:`Postgres.stop`, :meth:`Postgres.start`) for outage
tests; a test that stops it starts it again (and
:meth:`Postgres.new_database` starts it if it is stopped).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kapowserver import free_port

__all__ = ["PASSWORD", "USER", "Postgres", "find_binaries", "postgres"]

#: The role tests connect as, with a password over TCP (scram-sha-256).
USER, PASSWORD = "kapow", "kapow-test-password"
#: The cluster's superuser, reached over its Unix socket without a password.
SUPERUSER = "postgres"


def find_binaries() -> tuple[str, str] | None:
    """``initdb`` and ``pg_ctl``: on ``PATH``, else in Debian's ``/usr/lib/postgresql/*/bin`` (newest first)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl
    for directory in sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: _version(Path(d).parent.name), reverse=True
    ):
        initdb, pg_ctl = os.path.join(directory, "initdb"), os.path.join(directory, "pg_ctl")
        if os.access(initdb, os.X_OK) and os.access(pg_ctl, os.X_OK):
            return initdb, pg_ctl
    return None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


class Postgres:
    """
    A PostgreSQL cluster of its own in ``directory`` (made by :meth:`create`),
    listening on 127.0.0.1:``port`` and on a Unix socket in ``directory``.

    :ivar port: its TCP port on 127.0.0.1.
    """

    def __init__(self, initdb: str, pg_ctl: str, directory: Path, port: int) -> None:
        self._initdb, self._pg_ctl = initdb, pg_ctl
        self.directory, self.port = directory, port
        self.data = directory / "data"
        self.log = directory / "postgres.log"
        self.running = False
        self._names = itertools.count(1)
        # PostgreSQL will not run as root: the cluster is the postgres user's then.
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", SUPERUSER, "--"]

    @classmethod
    def create(cls, initdb: str, pg_ctl: str) -> Postgres:
        """A new cluster, started, with the role :data:`USER`; :meth:`destroy` it after."""
        directory = Path(tempfile.mkdtemp(prefix="kapow-postgres-"))
        cluster = cls(initdb, pg_ctl, directory, free_port())
        try:
            if cluster._as:
                owner = pwd.getpwnam(SUPERUSER)
                os.chown(directory, owner.pw_uid, owner.pw_gid)
            cluster._init()
            cluster.start()
            cluster.admin(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            [*self._as, *argv], capture_output=True, text=True, timeout=60, cwd=self.directory, check=False
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}{done.stderr}\n{log}"
            )

    def _init(self) -> None:
        self._run(
            self._initdb,
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        )

    def start(self) -> None:
        """Start the cluster (waiting until it takes connections); nothing if it runs."""
        if self.running:
            return
        # Durability is of no use to a test's throwaway data.
        settings = (
            f"-k {self.directory} -p {self.port} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            self._pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "-o", settings, "start"
        )
        self.running = True

    def stop(self) -> None:
        """Stop the cluster (fast shutdown: every connection is cut); nothing if it is stopped."""
        if not self.running:
            return
        self._run(self._pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
        self.running = False

    def admin(self, sql: str, database: str = "postgres") -> None:
        """Run ``sql`` as the superuser, outside a transaction."""
        import psycopg

        with psycopg.connect(
            host=str(self.directory), port=self.port, user=SUPERUSER, dbname=database, autocommit=True
        ) as connection:
            connection.execute(sql.encode())

    def uri(self, database: str, user: str = USER, password: str | None = PASSWORD) -> str:
        """The URI of ``database`` over TCP, as ``user`` with ``password``."""
        login = user if password is None else f"{user}:{password}"
        return f"postgresql://{login}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new, empty database owned by :data:`USER`; its URI (with the password)."""
        name = f"test_{next(self._names)}"
        self.start()
        # FILE_COPY: a copy of the template's files, quicker than WAL-logging
        # them when nothing is synced anyway.
        self.admin(f"CREATE DATABASE {name} OWNER {USER} STRATEGY FILE_COPY")
        return self.uri(name)

    def destroy(self) -> None:
        """Stop the cluster at once and remove its directory."""
        if self.running:
            subprocess.run(
                [*self._as, self._pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
                check=False,
            )
            self.running = False
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """The session's PostgreSQL cluster; skips where PostgreSQL is not installed."""
    binaries = find_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL not found: no initdb and pg_ctl on PATH or in /usr/lib/postgresql/*/bin")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            pytest.skip(f"running as root and there is no {SUPERUSER!r} user to run PostgreSQL as")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed")
    cluster = Postgres.create(*binaries)
    try:
        yield cluster
    finally:
        cluster.destroy()
