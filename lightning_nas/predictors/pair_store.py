"""The store of <architecture, (policy,) accuracy> pairs: one SQLite file, safe to kill and share.

Pairs are written in transactions (one pair, or one batch gathered from every rank), so a collector
killed with SIGKILL loses at most the batch it was measuring. Under DDP only global rank 0 opens
the store (SQLite over a network filesystem is unsafe, and nodes share no disk). Each planned measurement has a key (supernet checkpoint hash, kind, plan
seed and index); the key is UNIQUE, so a rerun skips what is done and two collectors on one file
(two processes) never write a pair twice. WAL journaling lets readers and one
writer work at the same time; writers wait for each other (``timeout``).

Kinds: ``fp32`` (a supernet subnet, full precision), ``quant`` (a subnet under an APQ policy) and
``mq`` (a per-layer weight-bit configuration of one trained network, quantized post-training by
``lightning-nas mqbench`` or ``allocate``: ``arch`` holds the network and its searchable layers,
``policy`` ``{w_bits: [...], a_bits, ptq}`` with ``ptq`` a hash of the PTQ settings).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import RecipeError

SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pair_key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    arch TEXT NOT NULL,
    policy TEXT,
    resolution INTEGER NOT NULL,
    top1 REAL NOT NULL,
    loss REAL,
    checkpoint_hash TEXT NOT NULL,
    seed INTEGER NOT NULL,
    seconds REAL NOT NULL,
    created_at TEXT NOT NULL,
    target TEXT
);
CREATE INDEX IF NOT EXISTS pairs_by_checkpoint ON pairs (checkpoint_hash, kind);
"""
COLUMNS = ("pair_key", "kind", "arch", "policy", "resolution", "top1", "loss", "checkpoint_hash", "seed",
           "seconds", "created_at", "target")


def canonical_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file (a supernet checkpoint), the identity pairs are measured against."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def plan_key(checkpoint_hash: str, kind: str, seed: int, index: int, target: str | None = None) -> str:
    """The key of planned pair ``index``. A quantized pair's key names its deployment target
    (``lightning_nas.targets``): the same plan index measured on another target's grid is another
    measurement, so a collector for one target never takes a pair of another as done."""
    if target is None:
        return f"{checkpoint_hash}:{kind}:{seed}:{index}"
    return f"{checkpoint_hash}:{kind}:{target}:{seed}:{index}"


@dataclass(frozen=True)
class Pair:
    arch: dict[str, Any]
    policy: dict[str, Any] | None
    resolution: int
    top1: float  # percent (0-100), as every accuracy of the package
    loss: float | None
    checkpoint_hash: str
    seed: int
    seconds: float
    kind: str = "fp32"
    created_at: str = ""
    pair_key: str = ""
    #: The deployment target whose fake-quantization grid a quantized pair was measured with
    #: (``lightning_nas.targets``); ``None`` for full-precision pairs and for stores older than targets.
    target: str | None = None


class PairStore:
    """Read and append pairs; opening creates the file and table if needed."""

    def __init__(self, path: str | Path, timeout: float = 60.0, key: str | None = None) -> None:
        """``key``: the recipe key that named the file, for the errors of a file that is no store."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        allowed = "a pairs.sqlite written by a pair collector, or a path where a new one may be created"
        try:
            with self._connect() as connection:
                self._use_wal(connection)
                columns = {row[1] for row in connection.execute("PRAGMA table_info(pairs)")}
                # stores written before deployment targets lack `target`: it is added, their pairs read None
                missing = [c for c in COLUMNS if columns and c not in columns and c != "target"]
                if missing:
                    raise RecipeError(f"a SQLite database, but its `pairs` table has no column {missing[0]!r}: not "
                                      "a pair store of this package", key=key, given=str(path), allowed=allowed)
                connection.executescript(SCHEMA)
                if columns and "target" not in columns:
                    connection.execute("ALTER TABLE pairs ADD COLUMN target TEXT")
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.OperationalError):  # locked, read-only, disk full: not the file's kind
                raise
            raise RecipeError(f"not a pair store: SQLite cannot read it ({error})", key=key, given=str(path),
                              allowed=allowed) from None

    def _use_wal(self, connection: sqlite3.Connection) -> None:
        """Switch the file to write-ahead logging. The switch upgrades a shared lock to an exclusive
        one; when two processes opening one new store both do that, SQLite answers one of them
        "locked" at once instead of calling its busy handler (waiting could deadlock), so the switch
        is retried until ``timeout`` (seen as a failed two-process test before this retry)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as error:
                busy = getattr(error, "sqlite_errorcode", sqlite3.SQLITE_BUSY) in (sqlite3.SQLITE_BUSY,
                                                                                     sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)) as connection:
            connection.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            yield connection

    def add(self, pair: Pair) -> bool:
        """Write one pair in its own transaction; False when its key is already stored."""
        return self.add_many([pair]) == 1

    def add_many(self, pairs: Iterable[Pair]) -> int:
        """Write pairs in one transaction (a kill keeps all of them or none); returns how many were new."""
        rows = [_pair_to_row(pair) for pair in pairs]
        if not rows:
            return 0
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                before = connection.total_changes
                connection.executemany(
                    f"INSERT OR IGNORE INTO pairs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                    rows)
                added = connection.total_changes - before
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            return added

    def has(self, pair_key: str) -> bool:
        with self._connect() as connection:
            return connection.execute("SELECT 1 FROM pairs WHERE pair_key = ?", (pair_key,)).fetchone() is not None

    def done_keys(self, prefix: str = "") -> set[str]:
        with self._connect() as connection:
            # an exact prefix: LIKE would read the "_" of target names (x86_avx2) as a wildcard
            rows = connection.execute("SELECT pair_key FROM pairs WHERE substr(pair_key, 1, ?) = ?",
                                      (len(prefix), prefix))
            return {key for (key,) in rows}

    def done_plan_keys(self, checkpoint_hash: str, kind: str, seed: int, target: str | None) -> set[str]:
        """The keys (:func:`plan_key`, with ``target``) of the plan's pairs already stored.

        Quantized pairs written before keys named their target have keys without it; those whose
        recorded ``target`` column is ``target`` count as done (under the key they would have
        now), those of another target or of none do not."""
        prefix = plan_key(checkpoint_hash, kind, seed, 0, target).rsplit(":", 1)[0] + ":"
        done = self.done_keys(prefix)
        if target is not None:
            legacy = plan_key(checkpoint_hash, kind, seed, 0).rsplit(":", 1)[0] + ":"
            with self._connect() as connection:
                rows = connection.execute("SELECT pair_key FROM pairs WHERE substr(pair_key, 1, ?) = ? AND target = ?",
                                          (len(legacy), legacy, target))
                for (key,) in rows:
                    index = key[len(legacy):]
                    if index.isdigit():
                        done.add(plan_key(checkpoint_hash, kind, seed, int(index), target))
        return done

    def pairs(self, kind: str | None = None, checkpoint_hash: str | None = None) -> list[Pair]:
        clauses, values = [], []
        for column, value in (("kind", kind), ("checkpoint_hash", checkpoint_hash)):
            if value is not None:
                clauses.append(f"{column} = ?")
                values.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._connect() as connection:
            rows = connection.execute(f"SELECT {', '.join(COLUMNS)} FROM pairs{where} ORDER BY id", values).fetchall()
        return [_row_to_pair(row) for row in rows]

    def targets(self, kind: str | None = None) -> set[str | None]:
        """The deployment targets the stored pairs (of ``kind``) were measured for."""
        where, values = (" WHERE kind = ?", (kind,)) if kind is not None else ("", ())
        with self._connect() as connection:
            return {t for (t,) in connection.execute(f"SELECT DISTINCT target FROM pairs{where}", values)}

    def __len__(self) -> int:
        with self._connect() as connection:
            return connection.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]


def _pair_to_row(pair: Pair) -> tuple[Any, ...]:
    return (
        pair.pair_key or plan_key(pair.checkpoint_hash, pair.kind, pair.seed, int(time.time_ns())),
        pair.kind,
        canonical_json(pair.arch),
        canonical_json(pair.policy),
        int(pair.resolution),
        float(pair.top1),
        None if pair.loss is None else float(pair.loss),
        pair.checkpoint_hash,
        int(pair.seed),
        float(pair.seconds),
        pair.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        pair.target,
    )


def _row_to_pair(row: Iterable[Any]) -> Pair:
    values: Mapping[str, Any] = dict(zip(COLUMNS, row))
    return Pair(
        arch=json.loads(values["arch"]),
        policy=None if values["policy"] is None else json.loads(values["policy"]),
        resolution=values["resolution"],
        top1=values["top1"],
        loss=values["loss"],
        checkpoint_hash=values["checkpoint_hash"],
        seed=values["seed"],
        seconds=values["seconds"],
        kind=values["kind"],
        created_at=values["created_at"],
        pair_key=values["pair_key"],
        target=values["target"],
    )
