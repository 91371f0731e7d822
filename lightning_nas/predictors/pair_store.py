"""The store of <architecture, (policy,) accuracy> pairs: one SQLite file, safe to kill and share.

Every pair is written in its own transaction, so a collector killed with SIGKILL loses at most the
pair it was measuring. Each planned measurement has a key (supernet checkpoint hash, kind, plan
seed and index); the key is UNIQUE, so a rerun skips what is done and two collectors on one file
(two DDP ranks, two processes) never write a pair twice. WAL journaling lets readers and one
writer work at the same time; writers wait for each other (``timeout``).
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
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pairs_by_checkpoint ON pairs (checkpoint_hash, kind);
"""
COLUMNS = ("pair_key", "kind", "arch", "policy", "resolution", "top1", "loss", "checkpoint_hash", "seed",
           "seconds", "created_at")


def canonical_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file (a supernet checkpoint), the identity pairs are measured against."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def plan_key(checkpoint_hash: str, kind: str, seed: int, index: int) -> str:
    return f"{checkpoint_hash}:{kind}:{seed}:{index}"


@dataclass(frozen=True)
class Pair:
    arch: dict[str, Any]
    policy: dict[str, Any] | None
    resolution: int
    top1: float
    loss: float | None
    checkpoint_hash: str
    seed: int
    seconds: float
    kind: str = "fp32"
    created_at: str = ""
    pair_key: str = ""


class PairStore:
    """Read and append pairs; opening creates the file and table if needed."""

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)) as connection:
            connection.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            yield connection

    def add(self, pair: Pair) -> bool:
        """Write one pair in its own transaction; False when its key is already stored."""
        row = (
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
        )
        with self._connect() as connection:
            cursor = connection.execute(
                f"INSERT OR IGNORE INTO pairs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", row)
            return cursor.rowcount == 1

    def has(self, pair_key: str) -> bool:
        with self._connect() as connection:
            return connection.execute("SELECT 1 FROM pairs WHERE pair_key = ?", (pair_key,)).fetchone() is not None

    def done_keys(self, prefix: str = "") -> set[str]:
        with self._connect() as connection:
            rows = connection.execute("SELECT pair_key FROM pairs WHERE pair_key LIKE ?", (prefix + "%",))
            return {key for (key,) in rows}

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

    def __len__(self) -> int:
        with self._connect() as connection:
            return connection.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]


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
    )
