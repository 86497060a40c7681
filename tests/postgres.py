"""A throwaway PostgreSQL server for the tests: ``initdb`` and ``pg_ctl`` (Debian's ``postgresql``
package) on a free loopback port, in a temporary folder, removed afterwards. As root, the server runs as
the ``postgres`` user (PostgreSQL refuses to run as root). :func:`cluster` skips the test, saying why,
where no server can be started."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from serving import free_port

START_SECONDS = 60


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class Cluster:
    """One PostgreSQL server; :meth:`database` makes a fresh, empty database on it."""

    def __init__(self, fsync: bool = False) -> None:
        self.initdb, self.pg_ctl = _binary("initdb"), _binary("pg_ctl")
        if self.initdb is None or self.pg_ctl is None:
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
        self.user = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        self.folder = Path(tempfile.mkdtemp(prefix="stable-cascade-pg-"))
        if self.user is not None:
            os.chown(self.folder, self.user.pw_uid, self.user.pw_gid)
        self.port = free_port()
        self.fsync = fsync
        self.url = self.address("postgres")

    def address(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str, timeout: float = START_SECONDS) -> None:
        user = None if self.user is None else self.user.pw_uid
        group = None if self.user is None else self.user.pw_gid
        done = subprocess.run(
            command,
            cwd=self.folder,
            user=user,
            group=group,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"},
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command[:2])} failed: {done.stderr.strip() or done.stdout.strip()}"
            )

    def start(self) -> Cluster:
        assert self.initdb is not None
        data = self.folder / "db"
        if not data.exists():
            try:
                self._run(
                    self.initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"
                )
            except (RuntimeError, OSError) as error:
                self.remove()
                pytest.skip(f"cannot create a PostgreSQL cluster here: {error}")
        self._ctl("start")
        return self

    def _ctl(self, action: str, *extra: str) -> None:
        assert self.pg_ctl is not None
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c max_connections=300"
        if not self.fsync:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        log = str(self.folder / "server.log")
        self._run(self.pg_ctl, "-D", str(self.folder / "db"), "-o", options, "-l", log, "-w", *extra, action)

    def restart(self) -> None:
        """Stop the server (its clients' connections drop) and start it again on the same port."""
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")

    def database(self) -> str:
        """The URL of a new, empty database."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.address(name)

    def remove(self) -> None:
        try:
            if (self.folder / "db" / "postmaster.pid").exists():
                self._ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def cluster(fsync: bool = False) -> Iterator[Cluster]:
    """A running PostgreSQL server for the block (the test skips where none can be started)."""
    pytest.importorskip("psycopg", reason="the PostgreSQL tests need psycopg (pip install -e '.[test]')")
    server = Cluster(fsync).start()
    try:
        yield server
    finally:
        server.remove()
