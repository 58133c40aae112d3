"""WebDataset shards (``equiav.data.shard``) on the real synthetic media: the writer's round trip,
batches identical to the file layout's in every loader mode, ranks and resume, DALI's own reader,
and the bad-input paths (a broken clip left out by the writer, a truncated shard named)."""

import json
import logging
import shutil
import tarfile

import numpy as np
import pytest
import torch

from dali_pipelines.loader import DaliLoader, LoaderConfig
from dali_pipelines.sources import CorruptMediaError, Shard
from equiav.config import AugmentConfig
from equiav.data.index import read_dataset, read_label_csv, shard_member, write_dataset
from equiav.data.media import MediaStore, store
from equiav.data.shard import INDEX_NAME, read_idx, scan_tar, write_shards
from tests.test_loader import collect

LISTS = {"frames": "train.json", "webm": "train_webm.json"}
# Small geometry: identity does not depend on it, and the loaders run 4x faster.
GEOMETRY = dict(target_frames=256, image_size=64)
AUGMENT = AugmentConfig(time_mask=48, ft_timem=48)


@pytest.fixture(scope="module")
def sharded(synth_small, tmp_path_factory):
    """Both training lists of ``synth_small`` written as shards of 3 clips (3, 3, 2)."""
    out = {}
    for layout, name in LISTS.items():
        root = tmp_path_factory.mktemp(f"shards_{layout}")
        report = write_shards(synth_small.root / name, root, 3, progress=False)
        assert report.clips == 8 and len(report.shards) == 3 and not report.skipped
        out[layout] = root
    return out


def make_loader(json_path, label_csv, mode, shard=None, state=None, **kw):
    kw.setdefault("batch_size", 2)
    cfg = LoaderConfig(
        mode=mode,
        frames_per_clip=4,
        eval_frame=2,
        augment=AUGMENT,
        cen_num=2 if mode == "pretrain" else 0,
        num_threads=1,
        **GEOMETRY,
        **kw,
    )
    entries = read_dataset(json_path)
    return DaliLoader(entries, read_label_csv(label_csv), cfg, shard, "cpu", state)


def assert_same(xs, ys):
    assert len(xs) == len(ys) > 0
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def _file_media(entry, layout):
    """(extension, path) of the original files that a clip's members hold."""
    if layout == "frames":
        return [("wav", entry.wav)] + [(f"frame{k}.jpg", entry.frame_path(k)) for k in range(4)]
    return [("wav", entry.wav), ("webm", entry.video_path)]


@pytest.mark.parametrize("layout", list(LISTS))
def test_members_hold_the_files_bytes_and_indexes_agree(synth_small, sharded, layout):
    root = sharded[layout]
    files = read_dataset(synth_small.root / LISTS[layout])
    shards = read_dataset(root / LISTS[layout])
    index = json.loads((root / INDEX_NAME).read_text())
    assert [e.video_id for e in shards] == [e.video_id for e in files]  # the list's order
    assert index["clips"] == 8 and [s["clips"] for s in index["shards"]] == [3, 3, 2]
    for f, s in zip(files, shards, strict=True):
        assert s.labels == f.labels and s.is_video_file == (layout == "webm")
        tar_path, _ = shard_member(s.wav)
        clip = index["samples"][s.video_id]
        assert str(root / clip["shard"]) == tar_path
        with tarfile.open(tar_path) as tar:  # a standard tar, readable by Python's tarfile
            for ext, path in _file_media(f, layout):
                name = f"{clip['key']}.{ext}"
                original = open(path, "rb").read()
                assert tar.extractfile(name).read() == original
                member = f"{tar_path}:{name}"
                assert store().read(member).tobytes() == original
                offset, size = clip["members"][name]
                assert tar.getmember(name).offset_data == offset and size == len(original)
            meta = json.load(tar.extractfile(f"{clip['key']}.json"))
        assert meta == {"video_id": f.video_id, "labels": list(f.labels)}
    for shard in index["shards"]:
        tar = root / shard["file"]
        ours = read_idx(root / shard["index"])
        assert ours == scan_tar(tar)
        assert len(ours) == shard["clips"] and tar.stat().st_size == shard["bytes"]
    # DALI's own indexer writes the same index file, byte for byte.
    wds2idx = pytest.importorskip("wds2idx")
    ref = root.parent / f"{root.name}-ref.idx"
    with wds2idx.IndexCreator(str(root / "shard-000001.tar"), str(ref), verbose=False) as c:
        c.create_index()
    assert ref.read_text() == (root / "shard-000001.idx").read_text()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary files


@pytest.mark.parametrize("layout", list(LISTS))
@pytest.mark.parametrize("mode", ["eval", "train", "pretrain", "finetune"])
def test_batches_equal_the_file_layouts(synth_small, sharded, layout, mode):
    sharded_json = sharded[layout] / LISTS[layout]
    assert all(shard_member(e.wav) for e in read_dataset(sharded_json))
    files = collect(make_loader(synth_small.root / LISTS[layout], synth_small.label_csv, mode))
    shards = collect(make_loader(sharded_json, synth_small.label_csv, mode))
    assert_same(shards, files)


def test_ranks_split_the_shards_and_resume_continues_exactly(synth_small, sharded):
    path, labels = sharded["frames"] / "train.json", synth_small.label_csv
    seen = []
    for rank in range(2):
        batches = collect(make_loader(path, labels, "train", Shard(rank, 2)))
        seen.append(torch.cat([b["index"] for b in batches]).tolist())
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(8))
    straight = collect(make_loader(path, labels, "pretrain"))
    first = make_loader(path, labels, "pretrain")
    done = collect(first, steps=1)
    resumed = make_loader(path, labels, "pretrain", state=first.state_dict())
    assert_same(done + collect(resumed), straight)


def test_dalis_webdataset_reader_yields_the_files_and_the_loaders_views(synth_small, sharded):
    from dali_pipelines.audio import features
    from dali_pipelines.webdataset import read_epoch, webdataset_reader

    files = read_dataset(synth_small.root / "train.json")
    loader = make_loader(synth_small.root / "train.json", synth_small.label_csv, "eval")
    ref = collect(loader)
    views = torch.cat([b["visual"] for b in ref])
    audio = torch.cat([b["audio"][:, 0] for b in ref])
    order = []
    for rank in range(2):
        pipe = webdataset_reader(
            sharded["frames"], batch_size=3, eval_frame=2, shard=Shard(rank, 2), **GEOMETRY
        )
        for sample in read_epoch(pipe):
            i = next(j for j, e in enumerate(files) if e.video_id == _video_id(sample))
            order.append(i)
            assert sample["wav"].tobytes() == open(files[i].wav, "rb").read()
            assert sample["media"].tobytes() == open(files[i].frame_path(2), "rb").read()
            assert torch.equal(torch.from_numpy(sample["visual"]), views[i])
            wave = torch.from_numpy(sample["wave"])[None]
            fb = features(wave, torch.from_numpy(sample["wave_len"]), -4.346, 4.332, 256)
            assert torch.equal(fb[0].T, audio[i])
    assert order == list(range(8))  # contiguous halves, in the list's order
    pipe = webdataset_reader(sharded["webm"], batch_size=4, shard=Shard(1, 2), **GEOMETRY)
    webm = read_dataset(synth_small.root / "train_webm.json")
    for i, sample in enumerate(read_epoch(pipe), start=4):
        assert _video_id(sample) == webm[i].video_id
        assert sample["media"].tobytes() == open(webm[i].video_path, "rb").read()


def _video_id(sample) -> str:
    return json.loads(sample["json"].tobytes())["video_id"]


def test_writer_reports_and_skips_broken_clips(synth_small, tmp_path, caplog):
    from equiav.data.shard import main

    src = tmp_path / "src"
    shutil.copytree(synth_small.root / "wav", src / "wav")
    shutil.copytree(synth_small.root / "frames", src / "frames")
    entries = [
        type(e)(e.video_id, str(src / "wav" / f"{e.video_id}.wav"), str(src / "frames"), e.labels)
        for e in read_dataset(synth_small.root / "train.json")
    ]
    write_dataset(src / "train.json", entries + [entries[0]])  # and a repeated id
    np.savetxt(src / "weights.csv", np.arange(9.0))
    (src / "wav" / f"{entries[1].video_id}.wav").unlink()
    jpg = entries[5].frame_path(3)
    data = open(jpg, "rb").read()
    open(jpg, "wb").write(data[: len(data) // 2])
    out = tmp_path / "out"
    args = [str(src / "train.json"), "--out", str(out), "--shard-size", "4", "--no-progress"]
    with caplog.at_level(logging.WARNING):
        assert main(args + ["--weights", str(src / "weights.csv")]) == 0
    assert "(3 skipped so far)" in caplog.text
    index = json.loads((out / INDEX_NAME).read_text())
    skipped = {s["video_id"]: s for s in index["skipped"]}
    assert skipped.keys() == {entries[1].video_id, entries[5].video_id, entries[0].video_id}
    assert skipped[entries[1].video_id]["file"] == entries[1].wav
    assert skipped[entries[5].video_id]["file"] == jpg
    assert "truncated JPEG" in skipped[entries[5].video_id]["reason"]
    kept = [e.video_id for e in read_dataset(out / "train.json")]
    assert kept == [e.video_id for i, e in enumerate(entries) if i not in (1, 5)]
    assert index["clips"] == 6 and [s["clips"] for s in index["shards"]] == [4, 2]
    np.testing.assert_array_equal(np.loadtxt(out / "weights.csv"), [0, 2, 3, 4, 6, 7])
    # A second run with larger shards replaces the first run's shards, leaving no stale ones.
    assert main(args[:3] + ["--shard-size", "8", "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.idx", "shard-000000.tar"]


def test_a_truncated_shard_is_named(synth_small, sharded, tmp_path, caplog):
    from equiav.data.check import check_dataset

    root = tmp_path / "shards"
    shutil.copytree(sharded["frames"], root)
    last = root / "shard-000002.tar"
    entries = read_dataset(root / "train.json")
    wav = entries[-1].wav  # the last clip's wav: cut in its middle
    offset, size = json.loads((root / INDEX_NAME).read_text())["samples"][entries[-1].video_id][
        "members"
    ][shard_member(wav)[1]]
    with open(last, "r+b") as f:
        f.truncate(offset + size // 2)
    with pytest.raises(CorruptMediaError, match=r"shard-000002\.tar:syn0_000007\.wav: truncated"):
        store().read(wav)
    # The loader skips the clip, naming the member; the checker reports it.
    with caplog.at_level(logging.WARNING):
        batches = collect(make_loader(root / "train.json", synth_small.label_csv, "eval"))
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(7))
    assert "shard-000002.tar:syn0_000007.wav: truncated shard" in caplog.text
    report = check_dataset(
        root / "train.json", synth_small.label_csv, seconds=4, frames_per_clip=4, workers=1
    )
    errors = report.errors()  # the wav and the four frames after it: each member named
    assert [i.file for i in errors] == [wav] + [entries[-1].frame_path(k) for k in range(4)]
    assert all("truncated shard" in i.message for i in errors) and report.usable == list(range(7))
    # Without its index file a shard is scanned (logged); a cut one is named as a whole.
    (root / "shard-000001.idx").unlink()
    fresh = MediaStore()
    with caplog.at_level(logging.WARNING):
        assert fresh.read(entries[3].wav).tobytes() == store().read(entries[3].wav).tobytes()
    assert "shard-000001.tar: no index file shard-000001.idx" in caplog.text
    (root / "shard-000002.idx").unlink()
    with pytest.raises(CorruptMediaError, match=r"shard-000002\.tar: not a readable tar shard"):
        fresh.read(entries[-2].wav)


def test_checker_and_build_loader_read_sharded_lists(synth_small, sharded, caplog):
    from dali_pipelines.loader import build_loader
    from equiav.config import apply_overrides, default_config
    from equiav.data.check import check_dataset
    from tests.tiny import synthetic_data_overrides

    kw = dict(seconds=4, frames_per_clip=4, deep=True, workers=1, progress=False)
    for layout, name in LISTS.items():
        files = check_dataset(synth_small.root / name, synth_small.label_csv, use_cache=False, **kw)
        shards = check_dataset(sharded[layout] / name, synth_small.label_csv, **kw)
        assert not shards.issues and shards.audio_info == files.audio_info
        assert shards.video_codec == files.video_codec
        again = check_dataset(sharded[layout] / name, synth_small.label_csv, **kw)
        assert again.from_cache_count == 8 and again.checked_count == 0
    overrides = synthetic_data_overrides(synth_small)
    overrides["data.train_json"] = str(sharded["webm"] / "train_webm.json")
    cfg = apply_overrides(default_config(), {**overrides, "train.batch_size": 4})
    with caplog.at_level(logging.WARNING):
        loader = build_loader(cfg, "train", "eval")
    assert "skipping" not in caplog.text
    assert sorted(torch.cat([b["index"] for b in loader]).tolist()) == list(range(8))
