"""The job store on PostgreSQL, through psycopg 3 and its connection pool (``pip install
'stable-cascade[postgres]'``): many API replicas and many workers on many hosts share one queue.

A connection lost (the server restarted, a network cut) fails the statement with :class:`StoreError`;
the pool checks each connection before lending it and opens new ones, so the next try goes through
once the server is back. Notifications travel with ``NOTIFY`` and are delivered on commit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from stable_cascade.server.database import Database, Listener, Note, Row, StoreError, Tx, dialect_sql

CONNECT_SECONDS = 10  # to open a connection
WAIT_SECONDS = 5.0  # for a connection from the pool: a request waits this long before its 503
#: How long the pool tries to reopen a lost connection (backing off) before it leaves the next try to
#: the next statement: short, so a restarted server is found again within seconds.
RECONNECT_SECONDS = 3.0
DRIVER_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


def where(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unreadable address)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


class PostgresDatabase(Database):
    """A pool of connections to the PostgreSQL database at ``url`` (``postgresql://user@host/db``)."""

    dialect = "postgresql"

    def __init__(self, url: str, max_connections: int = 10) -> None:
        self.url = url
        self.where = where(url)
        try:
            psycopg.connect(url, connect_timeout=CONNECT_SECONDS).close()  # the reason, when it cannot
        except (psycopg.Error, ValueError) as error:
            raise ValueError(
                f"cannot connect to the job store {where(url)} ({_line(error)}); check the address, that "
                "the server runs and accepts this user"
            ) from None
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"autocommit": True, "row_factory": dict_row},
            check=ConnectionPool.check_connection,
            timeout=WAIT_SECONDS,
            reconnect_timeout=RECONNECT_SECONDS,
            open=False,
            name="stable-cascade",
        )
        self._pool.open(wait=True, timeout=CONNECT_SECONDS)

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[Tx]:
        try:
            with self._pool.connection() as connection, connection.transaction():
                cursor = connection.cursor()
                if not durable:
                    cursor.execute("SET LOCAL synchronous_commit TO OFF")
                yield _PostgresTx(cursor)
        except DRIVER_ERRORS as error:
            raise StoreError(_line(error)) from None

    @contextmanager
    def read(self) -> Iterator[Tx]:
        try:
            with self._pool.connection() as connection:
                yield _PostgresTx(connection.cursor())
        except DRIVER_ERRORS as error:
            raise StoreError(_line(error)) from None

    def listen(self, *channels: str) -> Listener:
        return _PostgresListener(self.url, channels)

    def close(self) -> None:
        self._pool.close()


class _PostgresTx(Tx):
    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self.cursor = cursor

    def run(self, text: str, params: Sequence[Any] = ()) -> int:
        self.cursor.execute(dialect_sql(text, "postgresql"), tuple(params))  # type: ignore[arg-type]
        return int(self.cursor.rowcount)

    def rows(self, text: str, params: Sequence[Any] = ()) -> list[Row]:
        self.cursor.execute(dialect_sql(text, "postgresql"), tuple(params))  # type: ignore[arg-type]
        return [_plain(row) for row in self.cursor.fetchall()]

    def notify(self, channel: str, payload: str = "") -> None:
        self.cursor.execute("SELECT pg_notify(%s, %s)", (channel, payload))


class _PostgresListener(Listener):
    """``LISTEN`` on a connection of its own, opened again after it is lost (meanwhile: polling)."""

    def __init__(self, url: str, channels: Sequence[str]) -> None:
        self.url = url
        self.channels = tuple(channels)
        self._connection: psycopg.Connection[Any] | None = None

    def wait(self, timeout: float) -> list[Note]:
        started = time.monotonic()
        try:
            if self._connection is None:
                self._connection = self._connect()
            left = max(0.0, timeout - (time.monotonic() - started))
            found = self._connection.notifies(timeout=left, stop_after=1)
            return [(note.channel, note.payload) for note in found]
        except psycopg.Error:
            self.close()
            time.sleep(max(0.0, timeout - (time.monotonic() - started)))
            return []

    def _connect(self) -> psycopg.Connection[Any]:
        connection = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_SECONDS)
        for channel in self.channels:
            connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        return connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _plain(row: Any) -> Row:
    """A row with PostgreSQL's ``bytea`` (a memoryview when read in binary) as bytes."""
    return {key: bytes(value) if isinstance(value, memoryview) else value for key, value in row.items()}


def _line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
