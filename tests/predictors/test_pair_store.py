from __future__ import annotations

import multiprocessing as mp
import sqlite3
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


def test_a_batch_is_one_transaction_that_skips_stored_keys(tmp_path: Path) -> None:
    store = PairStore(tmp_path / "pairs.sqlite")
    assert store.add_many([make_pair(i) for i in range(3)]) == 3
    assert store.add_many([make_pair(2), make_pair(3), make_pair(3)]) == 1
    assert store.add_many([]) == 0
    # a batch that fails part-way (SQLite cannot store its second row) leaves nothing of itself behind
    broken = Pair(arch=ARCH, policy=None, resolution=24, top1=1.0, loss=None, checkpoint_hash=object(),  # type: ignore[arg-type]
                  seed=7, seconds=0.1, pair_key=plan_key("abc", "fp32", 7, 99))
    with pytest.raises(sqlite3.Error):
        store.add_many([make_pair(10), broken])
    assert sorted(int(k.rsplit(":", 1)[1]) for k in store.done_keys()) == [0, 1, 2, 3]


def test_quantized_pairs_keep_their_target_and_old_stores_gain_the_column(tmp_path: Path) -> None:
    import dataclasses
    import sqlite3

    from lightning_nas.data.pairs import PairsDataModule
    from lightning_nas.errors import RecipeError

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as connection:  # the schema before deployment targets
        connection.executescript(
            "CREATE TABLE pairs (id INTEGER PRIMARY KEY AUTOINCREMENT, pair_key TEXT NOT NULL UNIQUE, kind TEXT NOT "
            "NULL, arch TEXT NOT NULL, policy TEXT, resolution INTEGER NOT NULL, top1 REAL NOT NULL, loss REAL, "
            "checkpoint_hash TEXT NOT NULL, seed INTEGER NOT NULL, seconds REAL NOT NULL, created_at TEXT NOT NULL);"
            "INSERT INTO pairs (pair_key, kind, arch, resolution, top1, checkpoint_hash, seed, seconds, created_at) "
            "VALUES ('k', 'fp32', '{}', 32, 50.0, 'abc', 0, 1.0, 'then');")
    store = PairStore(path)
    assert store.pairs()[0].target is None
    from lightning_nas.registry import SPACES

    space = {"name": "ofa_mbv3_cifar", "num_classes": 10}
    arch = SPACES.build(space).smallest()
    policy = {key: [8] * len(arch["ks"]) for key in ("pw_w", "pw_a", "dw_w", "dw_a")}
    for i in range(6):
        pair = dataclasses.replace(make_pair(i, policy, kind="quant"), arch=arch, resolution=arch["r"])
        store.add(dataclasses.replace(pair, target="x86_avx2/torch"))
    assert store.targets("quant") == {"x86_avx2/torch"} and store.targets("fp32") == {None}
    data = PairsDataModule(path=str(path), space=space, kind="quant")
    data.setup()
    assert data.target == "x86_avx2/torch" and len(data.train_set) + len(data.val_set) == 6
    store.add(dataclasses.replace(pair, target="x86_vnni/torch", pair_key="other"))
    # one predictor learns one grid: pairs of two targets are not pooled unless the recipe allows it
    with pytest.raises(RecipeError, match=r"data.path: artifacts of different deployment targets"):
        PairsDataModule(path=str(path), space=space, kind="quant").setup()



def test_plan_keys_name_the_target_and_legacy_keys_count_for_their_own_target(tmp_path: Path) -> None:
    import dataclasses

    store = PairStore(tmp_path / "pairs.sqlite")
    assert plan_key("abc", "quant", 7, 3, "x86_avx2/onnxruntime") == "abc:quant:x86_avx2/onnxruntime:7:3"
    assert plan_key("abc", "fp32", 7, 3) == "abc:fp32:7:3"  # full-precision pairs have no target
    pair = make_pair(0, kind="quant")
    for index, target in ((0, "x86_avx2/torch"), (1, "x86_avx2/onnxruntime")):
        store.add(dataclasses.replace(pair, target=target, pair_key=plan_key("abc", "quant", 7, index, target)))
    # keys written before keys named their target: counted for the target they recorded only
    store.add(dataclasses.replace(pair, target="x86_avx2/torch", pair_key=plan_key("abc", "quant", 7, 5)))
    store.add(dataclasses.replace(pair, target=None, pair_key=plan_key("abc", "quant", 7, 6)))
    # a look-alike target ("_" is a LIKE wildcard) and another seed are not this plan's
    store.add(dataclasses.replace(pair, target="x86Xavx2/torch", pair_key=plan_key("abc", "quant", 7, 8, "x86Xavx2/torch")))
    store.add(dataclasses.replace(pair, target="x86_avx2/torch", pair_key=plan_key("abc", "quant", 8, 9, "x86_avx2/torch")))
    assert store.done_plan_keys("abc", "quant", 7, "x86_avx2/torch") == {
        plan_key("abc", "quant", 7, i, "x86_avx2/torch") for i in (0, 5)}
    assert store.done_plan_keys("abc", "quant", 7, "x86_avx2/onnxruntime") == {
        plan_key("abc", "quant", 7, 1, "x86_avx2/onnxruntime")}
    assert store.done_plan_keys("abc", "quant", 7, None) == {plan_key("abc", "quant", 7, i) for i in (5, 6)}


def test_pairs_data_module_trains_on_the_named_target_of_a_mixed_store(tmp_path: Path) -> None:
    import dataclasses

    from lightning_nas.data.pairs import PairsDataModule
    from lightning_nas.errors import RecipeError
    from lightning_nas.registry import SPACES

    space = {"name": "ofa_mbv3_cifar", "num_classes": 10}
    arch = SPACES.build(space).smallest()
    policy = {key: [8] * len(arch["ks"]) for key in ("pw_w", "pw_a", "dw_w", "dw_a")}
    store = PairStore(tmp_path / "pairs.sqlite")
    for target, count in (("x86_avx2/torch", 5), ("x86_avx2/onnxruntime", 7)):
        for i in range(count):
            pair = dataclasses.replace(make_pair(i, policy, kind="quant"), arch=arch, resolution=arch["r"],
                                       top1=60.0 + i, target=target)
            store.add(dataclasses.replace(pair, pair_key=plan_key("abc", "quant", 7, i, target)))
    with pytest.raises(RecipeError, match="different deployment targets"):
        PairsDataModule(path=str(store.path), space=space, kind="quant").setup()
    data = PairsDataModule(path=str(store.path), space=space, kind="quant", target="x86_avx2/onnxruntime")
    data.setup()
    assert data.target == "x86_avx2/onnxruntime" and len(data.train_set) + len(data.val_set) == 7
    with pytest.raises(RecipeError, match=r"(?s)data.target: .*x86_avx2/onnxruntime, x86_avx2/torch"):
        PairsDataModule(path=str(store.path), space=space, kind="quant", target="x86_vnni/torch").setup()
