"""The registry's SQLite database: opening it (WAL, busy timeout, foreign keys, migrations),
read and write transactions, and retrying a transaction while another process holds the lock.

The schema itself is in ``adapterctl.migrations``.
"""

from __future__ import annotations

import contextlib
import datetime
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from adapterctl.errors import OperationalError

if TYPE_CHECKING:
    from sqlite_utils import Database

DB_NAME = "registry.db"
BUSY_TIMEOUT_S = 30.0  # SQLite's own wait for a lock, per statement
LOCK_DEADLINE_S = 120.0  # our retries on top of it, per operation

T = TypeVar("T")


def now() -> str:
    """The current UTC time as stored in the registry (ISO 8601, microseconds)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def connect(home: Path, path: Path) -> Database:
    """Open (creating ``home`` and the file when missing) and migrate the database.

    Args:
        home: the registry's folder.
        path: the database file in it.

    Returns:
        The database, migrated to the latest schema.

    Raises:
        sqlite3.Error: as SQLite raises it (``retry`` turns it into a message).
    """
    from sqlite_utils import Database

    from adapterctl import migrations

    home.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    try:
        db = Database(conn, execute_plugins=False)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        if migrations.pending(db):
            conn.execute("BEGIN IMMEDIATE")  # one migrator at a time
            try:
                if migrations.pending(db):
                    migrations.apply(db)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
    except BaseException:
        conn.close()
        raise
    return db


class LazyDatabase:
    """The registry's database, opened (and migrated) on first use.

    Args:
        home: the registry's folder.
        path: the database file in it.
    """

    def __init__(self, home: Path, path: Path):
        self.home = home
        self.path = path
        self._db: Database | None = None

    @property
    def db(self) -> Database:
        """The open database, migrated to the latest schema."""
        if self._db is None:
            self._db = retry(lambda: connect(self.home, self.path), "opening the registry")
        return self._db

    def close(self) -> None:
        """Close the connection (the next use reopens it)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; ``BEGIN IMMEDIATE`` takes the write lock up front, so a
        transaction never fails half-way on a lock upgrade."""
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for several queries."""
        conn = self.db.conn
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")


def rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[dict]:
    """Run a query; each row as a dict keyed by column name."""
    cur = conn.execute(sql, params)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]


def first_row(conn: sqlite3.Connection, sql: str, params: Sequence[Any], missing: str) -> dict:
    """The first row of a query that must find one (other rows say it exists).

    Args:
        conn: an open transaction.
        sql: the query.
        params: its parameters.
        missing: what it means when there is none, for the message.

    Raises:
        OperationalError: there is none: the database is damaged (``damaged``, exit 1).
    """
    found = rows(conn, sql, params)
    if not found:
        raise damaged(conn, missing)
    return found[0]


def damaged(conn: sqlite3.Connection, what: str) -> OperationalError:
    """The error for a database whose rows contradict each other (a row deleted or edited
    behind the registry's back, its append-only triggers dropped): exit 1, naming the
    database file and how to see everything that is wrong.

    Args:
        conn: the connection the contradiction was found on.
        what: what was found ("chat@prod points at version id 7, which has no row").
    """
    found = conn.execute("PRAGMA database_list").fetchone()
    where = found[2] if found and found[2] else DB_NAME
    return OperationalError(
        f"{where}: the registry database is damaged ({what}); see everything that is wrong "
        "with: adapterctl registry verify, then restore registry.db from a backup"
    )


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def retry(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` (a whole transaction), again while SQLite says another process holds the
    lock, with jittered backoff, up to ``LOCK_DEADLINE_S``.

    Args:
        fn: the transaction.
        what: what it does, for messages ("adding chat").

    Returns:
        What ``fn`` returns.

    Raises:
        OperationalError: the lock was held past the deadline, or another database error (1).
    """
    deadline = time.monotonic() + LOCK_DEADLINE_S
    delay = 0.01
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise OperationalError(
                    f"registry database error while {what} ({exc}); "
                    "check it with: adapterctl registry verify"
                ) from None
            if time.monotonic() > deadline:
                raise OperationalError(
                    f"the registry stayed locked by another process for {LOCK_DEADLINE_S:.0f} s "
                    f"while {what}; try again when it is done"
                ) from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)
        except sqlite3.DatabaseError as exc:
            raise OperationalError(
                f"registry database error while {what} ({exc}); "
                "check it with: adapterctl registry verify"
            ) from None
