"""The job store's database, one interface over two engines: SQLite (a file beside the data folder's
images and uploads; one host, any number of processes on it) and PostgreSQL (see
:mod:`stable_cascade.server.postgres`; many hosts).

The store writes its SQL once, for both: ``?`` placeholders, ``{now}`` for the database's clock in
seconds since the epoch (leases are timed by the database, so the workers' clocks need not agree) and
``{skip_locked}`` after a ``SELECT`` that claims a row (PostgreSQL's ``FOR UPDATE SKIP LOCKED``; on
SQLite the write transaction, taken at once with ``BEGIN IMMEDIATE``, already excludes the others).
Notifications (:meth:`Tx.notify`) reach the :class:`Listener` of every process on PostgreSQL
(``NOTIFY``) and of this process on SQLite; other SQLite processes poll.
"""

from __future__ import annotations

import abc
import functools
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

Row = dict[str, Any]
Note = tuple[str, str]  # (channel, payload)

_NOW = {
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
    "postgresql": "extract(epoch from clock_timestamp())::double precision",
}
_SKIP_LOCKED = {"sqlite": "", "postgresql": " FOR UPDATE SKIP LOCKED"}
BUSY_SECONDS = 10.0  # how long SQLite waits for another process's write transaction


class StoreError(Exception):
    """The job store cannot be reached or written just now (retried by workers, 503 for clients)."""


@functools.lru_cache(maxsize=512)
def dialect_sql(sql: str, dialect: str) -> str:
    """``sql`` as written by the store, in ``dialect``'s own words."""
    text = sql.replace("{now}", _NOW[dialect]).replace("{skip_locked}", _SKIP_LOCKED[dialect])
    return text.replace("?", "%s") if dialect == "postgresql" else text


class Tx(abc.ABC):
    """The statements of one transaction (or, for reads, of one connection's turn)."""

    @abc.abstractmethod
    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute ``sql``; how many rows it changed."""

    @abc.abstractmethod
    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Execute ``sql``; its rows, each a dict by column name."""

    @abc.abstractmethod
    def notify(self, channel: str, payload: str = "") -> None:
        """Tell the listeners of ``channel`` once this transaction commits."""

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        found = self.rows(sql, params)
        return found[0] if found else None


class Listener(abc.ABC):
    """Notifications on some channels; :meth:`wait` returns early when one arrives."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> list[Note]:
        """The notifications that arrived (possibly none: a timeout, the polling fallback)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Database(abc.ABC):
    """A connection (or a pool of them) to one job database."""

    dialect: str
    where: str  # for messages: the file, or the server's address without a password

    @abc.abstractmethod
    def transaction(self, durable: bool = True) -> AbstractContextManager[Tx]:
        """A write transaction (``durable=False``: may be lost in a power cut, for live news)."""

    @abc.abstractmethod
    def read(self) -> AbstractContextManager[Tx]:
        """Reads that need no transaction of their own."""

    @abc.abstractmethod
    def listen(self, *channels: str) -> Listener: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class SqliteDatabase(Database):
    """A SQLite file in write-ahead-log mode, shared by this process's threads and by other processes."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        self._key = str(path.resolve())
        self._main = _connect(path, "FULL")
        try:
            self._quick = _connect(path, "OFF")  # live news: lost in a power cut at worst
        except sqlite3.Error:
            self._main.close()
            raise
        self._locks = {id(self._main): threading.Lock(), id(self._quick): threading.Lock()}

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[Tx]:
        db = self._main if durable else self._quick
        with self._locks[id(db)]:
            tx = _SqliteTx(db)
            db.execute("BEGIN IMMEDIATE")
            try:
                yield tx
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        for channel, payload in tx.notes:
            _BELLS.ring(self._key, channel, payload)

    @contextmanager
    def read(self) -> Iterator[Tx]:
        with self._locks[id(self._main)]:
            yield _SqliteTx(self._main)

    def listen(self, *channels: str) -> Listener:
        return _BELLS.listener(self._key, channels)

    def close(self) -> None:
        for db in (self._main, self._quick):
            with self._locks[id(db)]:
                db.close()


class _SqliteTx(Tx):
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.notes: list[Note] = []

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.db.execute(dialect_sql(sql, "sqlite"), tuple(params)).rowcount

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        cursor = self.db.execute(dialect_sql(sql, "sqlite"), tuple(params))
        return [dict(row) for row in cursor.fetchall()]

    def notify(self, channel: str, payload: str = "") -> None:
        self.notes.append((channel, payload))


def open_sqlite(path: Path) -> Database:
    """The job database at ``path`` (created when missing), checked readable: a one-line
    ``ValueError`` for a file that is not one, or is truncated or corrupt."""
    db = None
    try:
        db = SqliteDatabase(path)
        with db.read() as tx:
            problems = [row["quick_check"] for row in tx.rows("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"database disk image is malformed: {'; '.join(problems[:3])}")
    except sqlite3.DatabaseError as error:
        if db is not None:
            db.close()
        raise ValueError(
            f"{path} is not a readable job database ({' '.join(str(error).split())}); move it (and "
            f"{path.name}-wal, {path.name}-shm) elsewhere to start with an empty queue, or restore a backup"
        ) from None
    return db


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=BUSY_SECONDS, check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
        _write_ahead_log(db)
        db.execute(f"PRAGMA synchronous={synchronous}")
    except sqlite3.Error:
        db.close()
        raise
    return db


def _write_ahead_log(db: sqlite3.Connection) -> None:
    """Switch ``db`` to WAL mode. The switch needs the file to itself and SQLite answers "database is
    locked" at once, without its busy wait, while another connection opens it: retried up to
    ``BUSY_SECONDS``."""
    deadline = time.monotonic() + BUSY_SECONDS
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class _BellListener(Listener):
    def __init__(self, bells: _Bells, key: str, channels: Sequence[str]) -> None:
        self._bells, self._key = bells, key
        self.channels = frozenset(channels)
        self.notes: list[Note] = []
        self.condition = threading.Condition()

    def wait(self, timeout: float) -> list[Note]:
        with self.condition:
            if not self.notes:
                self.condition.wait(timeout)
            notes, self.notes = self.notes, []
        return notes

    def close(self) -> None:
        self._bells.remove(self._key, self)


class _Bells:
    """This process's listeners of each SQLite file (other processes find the news by polling)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[str, set[_BellListener]] = {}

    def listener(self, key: str, channels: Sequence[str]) -> Listener:
        listener = _BellListener(self, key, channels)
        with self._lock:
            self._listeners.setdefault(key, set()).add(listener)
        return listener

    def remove(self, key: str, listener: _BellListener) -> None:
        with self._lock:
            self._listeners.get(key, set()).discard(listener)

    def ring(self, key: str, channel: str, payload: str) -> None:
        with self._lock:
            listeners = [each for each in self._listeners.get(key, ()) if channel in each.channels]
        for listener in listeners:
            with listener.condition:
                listener.notes.append((channel, payload))
                listener.condition.notify_all()


_BELLS = _Bells()
