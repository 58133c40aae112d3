"""The dataset index: ``read_dataset``'s column-wise ``EntryTable`` and ``LabelRows``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from dali_pipelines.sources import SampleSource, Shard, SourceSpec
from equiav.data.index import (
    DatasetError,
    Entry,
    EntryTable,
    LabelRows,
    LabelSet,
    read_dataset,
    write_dataset,
)

MIDS = tuple(f"/m/{i:03x}" for i in range(527))
LABELS = LabelSet(MIDS, tuple(f"class {i}" for i in range(527)))


def _entries(n: int, seed: int = 0) -> list[Entry]:
    """``n`` entries with 0-4 labels each (some none), unicode ids, shared and own folders."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(0, 5))
        labels = tuple(MIDS[j] for j in rng.choice(len(MIDS), k, replace=False))
        vid = f"clip-{i}-é" if i % 7 == 0 else f"clip{i:06d}"
        folder = "/data/frames" if i % 3 else f"/data/videos/{vid}.webm"
        out.append(Entry(vid, f"/data/wav/{vid}.wav", folder, labels))
    return out


def test_read_dataset_resolves_paths_and_parses_labels(tmp_path: Path) -> None:
    doc = {
        "data": [
            {"video_id": "a", "wav": "wav/a.wav", "video_path": "frames", "labels": "/m/1, /m/2,"},
            {"video_id": 7, "wav": "/abs/b.wav", "video_path": "v/../b.webm", "labels": ["/m/2"]},
            {"video_id": "ü", "wav": "./c.wav", "video_path": "/abs/c.mp4", "labels": ""},
        ]
    }
    (tmp_path / "d.json").write_text(json.dumps(doc))
    table = read_dataset(tmp_path / "d.json")
    root = str(tmp_path.resolve())
    assert isinstance(table, EntryTable) and len(table) == 3
    assert list(table) == [
        Entry("a", f"{root}/wav/a.wav", f"{root}/frames", ("/m/1", "/m/2")),
        Entry("7", "/abs/b.wav", f"{root}/b.webm", ("/m/2",)),
        Entry("ü", f"{root}/c.wav", "/abs/c.mp4", ()),
    ]
    assert table.vocabulary == ("/m/1", "/m/2")  # the list's own labels, first seen first


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ([1, 2], "entry 1: expected an object, got list"),
        ({"video_id": "x", "wav": "x.wav", "labels": "/m/1"}, r"entry 1 \(x\): missing keys"),
        ({"video_id": "x", "wav": "w", "video_path": "v", "labels": 3}, r"entry 1 \(x\): labels"),
    ],
)
def test_read_dataset_names_the_bad_entry(tmp_path: Path, item: object, message: str) -> None:
    good = {"video_id": "g", "wav": "g.wav", "video_path": "f", "labels": "/m/1"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"data": [good, item]}))
    with pytest.raises(DatasetError, match=message) as err:
        read_dataset(path)
    assert str(path) in str(err.value)


def test_table_is_a_sequence_of_its_entries() -> None:
    entries = _entries(300)
    # Paths come back exactly as stored, whatever their folder part.
    entries[1] = Entry("x", "no-folder.wav", "/data/frames/", ("/m/001",))
    entries[2] = Entry("y", "/w.wav", "rel/dir/../v.webm", ())
    table = EntryTable.from_entries(entries)
    assert len(table) == 300 and table == entries and list(table) == entries
    assert table[-1] == entries[-1] and table[0] == entries[0]
    with pytest.raises(IndexError):
        table[300]
    assert table[10:40:3] == entries[10:40:3] and isinstance(table[10:40:3], EntryTable)
    picked = [5, 299, 0, 5, 17]
    assert list(table.take(picked)) == [entries[i] for i in picked]
    assert len(table.take([])) == 0
    assert table + entries[:2] == entries + entries[:2]
    assert entries[:2] + table == entries[:2] + entries
    assert table != entries[:-1] and table != [*entries[:-1], entries[0]]
    assert entries[42] in table and table.index(entries[42]) == 42


def test_table_survives_pickle_arrays_and_writes_back(tmp_path: Path) -> None:
    entries = _entries(200, seed=1)
    table = EntryTable.from_entries(entries)
    assert pickle.loads(pickle.dumps(table)) == entries
    np.savez(tmp_path / "t.npz", **table.to_arrays())
    with np.load(tmp_path / "t.npz", allow_pickle=False) as arrays:
        assert EntryTable.from_arrays(dict(arrays)) == entries
    write_dataset(tmp_path / "d.json", table, relative=False)
    assert read_dataset(tmp_path / "d.json") == entries


def test_label_rows_equal_multi_hot_for_tables_and_lists() -> None:
    entries = _entries(500, seed=2)
    table = EntryTable.from_entries(entries)
    for rows in (LabelRows.build(table, LABELS), LabelRows.build(entries, LABELS)):
        assert len(rows) == 500 and rows.num_classes == 527
        for i, e in enumerate(entries):
            np.testing.assert_array_equal(rows.row(i), LABELS.multi_hot(e.labels))
    # A table taken out of order keeps each entry's own labels.
    order = np.random.default_rng(3).permutation(500)
    rows = LabelRows.build(table.take(order), LABELS)
    for k, i in enumerate(order):
        np.testing.assert_array_equal(rows.row(k), LABELS.multi_hot(entries[i].labels))


def test_label_rows_name_an_unknown_label() -> None:
    entries = _entries(50)
    entries[31] = Entry("odd", "/w.wav", "/f", (MIDS[0], "/m/not-there"))
    for seq in (entries, EntryTable.from_entries(entries)):
        with pytest.raises(KeyError, match="odd: label '/m/not-there'"):
            LabelRows.build(seq, LABELS)


def test_a_long_list_is_held_and_pickled_compactly(tmp_path: Path) -> None:
    """What a training process holds and each spawned DALI worker receives: the source with
    its list and label rows. As ``Entry`` objects and a dense (entries x 527) float32 label
    matrix this was ~0.8 kB per entry in memory and 2.1 kB per entry pickled (AudioSet-2M:
    1.6 GB and 4.3 GB per process); now it is the columns' bytes."""
    import tracemalloc

    entries = _entries(20_000, seed=4)
    write_dataset(tmp_path / "d.json", entries, relative=False)
    tracemalloc.start()
    try:
        table = read_dataset(tmp_path / "d.json")
        held = tracemalloc.get_traced_memory()[0] / len(entries)
    finally:
        tracemalloc.stop()
    assert table == entries
    assert held < 120, held
    spec = SourceSpec(table, LABELS, batch_size=8, shard=Shard(), mode="train")
    pickled = pickle.dumps(SampleSource(spec))
    assert len(pickled) / len(entries) < 110, len(pickled) / len(entries)
    again = pickle.loads(pickled)
    for i in (0, 123, 19_999):
        np.testing.assert_array_equal(again.label_rows.row(i), LABELS.multi_hot(entries[i].labels))
        assert again.spec.entries[i] == entries[i]
