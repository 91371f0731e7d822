from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest

from lightning_nas.predictors.pair_store import Pair, PairStore, file_hash, plan_key

ARCH = {"ks": [3, 5], "e": [4, 6], "d": [2], "r": 32}


def make_pair(index: int, policy: dict | None = None, kind: str = "fp32") -> Pair:
    return Pair(arch={**ARCH, "r": 24 + index % 3 * 4}, policy=policy, resolution=24 + index % 3 * 4,
                top1=50.0 + index, loss=1.0 / (index + 1), checkpoint_hash="abc", seed=7, seconds=0.5,
                kind=kind, pair_key=plan_key("abc", kind, 7, index))


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    store = PairStore(tmp_path / "pairs.sqlite")
    policy = {"pw_w": [4, 8], "pw_a": [8, 8], "dw_w": [6, 6], "dw_a": [8, 4]}
    assert store.add(make_pair(0)) and store.add(make_pair(1, policy, kind="quant"))
    fp, quant = PairStore(tmp_path / "pairs.sqlite").pairs()
    assert fp.arch == ARCH | {"r": 24} and fp.policy is None and fp.top1 == pytest.approx(50.0)
    assert quant.policy == policy and quant.kind == "quant" and quant.resolution == 28
    assert quant.loss == pytest.approx(0.5) and quant.created_at
    assert [p.kind for p in store.pairs(kind="quant")] == ["quant"]


def test_planned_keys_are_written_once(tmp_path: Path) -> None:
    store = PairStore(tmp_path / "pairs.sqlite")
    assert store.add(make_pair(3))
    assert not store.add(make_pair(3))
    assert len(store) == 1 and store.done_keys("abc:fp32:7:") == {plan_key("abc", "fp32", 7, 3)}


def _writer(path: str, indices: list[int], start: Any, inserted: Any) -> None:
    start.wait(60)  # both processes open and write the (not yet existing) file at the same moment
    store = PairStore(path, timeout=30)
    inserted.put(sum(store.add(make_pair(index)) for index in indices))


def test_two_processes_write_one_store_at_once_losing_and_duplicating_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "pairs.sqlite")
    context = mp.get_context("spawn")
    start, inserted = context.Barrier(2), context.Queue()
    # overlapping plans: both try 40..59
    workers = [context.Process(target=_writer, args=(path, list(range(0, 60)), start, inserted)),
               context.Process(target=_writer, args=(path, list(range(40, 100)), start, inserted))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    pairs = PairStore(path).pairs()
    keys = [p.pair_key for p in pairs]
    assert len(keys) == 100 == len(set(keys))
    assert {int(k.rsplit(":", 1)[1]) for k in keys} == set(range(100))
    assert inserted.get(timeout=5) + inserted.get(timeout=5) == 100  # every pair inserted by exactly one
    assert all(p.top1 == pytest.approx(50.0 + int(p.pair_key.rsplit(":", 1)[1])) for p in pairs)


def test_file_hash_changes_with_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert file_hash(a) == file_hash(a) != file_hash(b)
