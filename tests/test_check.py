"""Tests of the dataset checker on a real synthetic dataset with deliberately broken entries.

One small dataset (8 clips of 3 s: wav, VP9 webm, H.264 mp4, JPEG frames) is generated once; each
test breaks a copy of it and checks that every problem is reported with its kind, entry and file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from equiav.data import check
from equiav.data.check import check_dataset, main
from equiav.data.index import (
    DatasetError,
    compute_weights,
    read_dataset,
    read_weights,
    write_dataset,
)
from equiav.data.synth import generate

SECONDS = 3.0
FRAMES = 3  # frame_0..frame_2 exist for 3 s clips
SR = 16000


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, clips=8, classes=4, seed=0, seconds=SECONDS, test_fraction=0.25)
    return root


@pytest.fixture
def data(synth_root: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic dataset (lists use relative paths, so copies work)."""
    out = tmp_path / "data"
    shutil.copytree(synth_root, out, ignore=shutil.ignore_patterns(".equiav-cache"))
    return out


def run_check(json_path: Path, label_csv: Path | None = None, **kw) -> check.CheckReport:
    kw.setdefault("use_cache", False)
    return check_dataset(
        json_path,
        label_csv or json_path.parent / "class_labels_indices.csv",
        seconds=SECONDS,
        frames_per_clip=FRAMES,
        progress=False,
        **kw,
    )


def run_cli(json_path: Path, *args: str) -> int:
    label_csv = str(json_path.parent / "class_labels_indices.csv")
    argv = [str(json_path), "--label-csv", label_csv, "--seconds", str(SECONDS)]
    return main(argv + ["--no-progress", "--no-cache", *args])


def found(report: check.CheckReport) -> set[tuple[str, str, int, str]]:
    return {(i.severity, i.kind, i.index, i.file) for i in report.issues}


def write_wav(path: Path, seconds: float, sr: int = SR, channels: int = 1) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((int(seconds * sr), channels)) * 3000).astype(np.int16)
    sf.write(path, x, sr, subtype="PCM_16")


def test_clean_dataset_has_no_issues(data: Path) -> None:
    for name in ("train", "train_webm"):
        report = run_check(data / f"{name}.json")
        assert report.issues == [], name
        assert report.usable == list(range(6))
        assert report.audio_info == [(SR, 1, int(SECONDS * SR))] * 6
    webm = run_check(data / "train_webm.json")
    assert webm.video_codec == ["vp9"] * 6
    assert run_check(data / "train.json").video_codec == [None] * 6
    assert run_cli(data / "train.json", "--strict") == 0


def test_mp4_is_cpu_undecodable_and_capped_output(data: Path, tmp_path: Path, capsys) -> None:
    report = run_check(data / "train_mp4.json")
    assert report.video_codec == ["h264"] * 6
    assert report.counts() == {"cpu_undecodable": 6}
    assert report.errors() == [] and report.usable == list(range(6))
    for i, issue in enumerate(report.issues):
        assert (issue.severity, issue.index) == ("warning", i)
        assert issue.file == report.entries[i].video_path and "h264" in issue.message
    # Without a GPU the loader promotes them to errors: nothing is usable then.
    cpu = report.promote("cpu_undecodable")
    assert len(cpu.errors()) == 6 and cpu.usable == []

    r_json = tmp_path / "r.json"
    code = run_cli(data / "train_mp4.json", "--max-lines", "2", "--report", str(r_json))
    out = capsys.readouterr().out
    assert code == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("WARNING cpu_undecodable")]
    assert len(lines) == 2 and "... and 4 more WARNING cpu_undecodable" in out
    assert "warnings: 6 (cpu_undecodable 6)" in out
    full = json.loads(r_json.read_text())
    assert len(full["issues"]) == 6 and full["counts"] == {"cpu_undecodable": 6}
    assert run_cli(data / "train_mp4.json", "--strict") == 1
    assert run_cli(data / "train_mp4.json", "--cpu-only") == 1


def test_broken_entries_are_reported(data: Path, capsys) -> None:
    frames = read_dataset(data / "train.json")
    webm = read_dataset(data / "train_webm.json")
    mp4 = read_dataset(data / "train_mp4.json")
    test = read_dataset(data / "test.json")
    wav = [Path(e.wav) for e in frames]
    rng = np.random.default_rng(1)

    wav[0].unlink()  # 0: missing wav
    wav[1].write_bytes(rng.bytes(5000))  # 1: garbage wav
    wav[2].write_bytes(wav[3].read_bytes()[:20])  # 2: wav cut inside its header
    os.remove(frames[3].frame_path(1))  # 3: frames folder missing frame_1
    Path(webm[4].video_path).write_bytes(rng.bytes(8000))  # 4: garbage webm
    write_wav(wav[5], SECONDS, sr=44100)  # 5: 44.1 kHz
    test_wav = [Path(e.wav) for e in test]
    write_wav(test_wav[0], SECONDS, channels=2)  # 6: stereo
    write_wav(test_wav[1], 1.0)  # 7: too short
    entries = [
        frames[0],
        frames[1],
        frames[2],
        frames[3],
        dataclasses.replace(webm[4], video_id="webm4"),  # the webm's name does not use the id
        frames[5],
        test[0],
        test[1],
        dataclasses.replace(frames[4], labels=("/m/syn001", "/m/nope")),  # 8: unknown label
        test[0],  # 9: a second entry with entry 6's id
        dataclasses.replace(mp4[3], video_id="fresh_id", labels=()),  # 10: empty labels, mp4
        dataclasses.replace(frames[4], video_id="gone", video_path=str(data / "nope")),  # 11
    ]
    write_dataset(data / "mixed.json", entries)
    report = run_check(data / "mixed.json")

    js = str(data / "mixed.json")
    expected = {
        ("error", "missing_media", 0, str(wav[0])),
        ("error", "unreadable_media", 1, str(wav[1])),
        ("error", "unreadable_media", 2, str(wav[2])),
        ("error", "missing_frames", 3, frames[3].video_path),
        ("error", "unreadable_media", 4, webm[4].video_path),
        ("warning", "sample_rate", 5, str(wav[5])),
        ("warning", "multichannel", 6, str(test_wav[0])),
        ("warning", "multichannel", 9, str(test_wav[0])),
        ("warning", "short_audio", 7, str(test_wav[1])),
        ("error", "unknown_label", 8, js),
        ("error", "duplicate_id", 9, js),
        ("error", "empty_labels", 10, js),
        ("warning", "cpu_undecodable", 10, mp4[3].video_path),
        ("error", "missing_media", 11, str(data / "nope")),
    }
    assert found(report) == expected
    assert report.counts() == {
        "duplicate_id": 1,
        "empty_labels": 1,
        "missing_frames": 1,
        "missing_media": 2,
        "unknown_label": 1,
        "unreadable_media": 3,
        "cpu_undecodable": 1,
        "multichannel": 2,
        "sample_rate": 1,
        "short_audio": 1,
    }
    assert report.usable == [5, 6, 7]  # warnings keep an entry; the first of a duplicate stays
    msg = {(i.kind, i.index): i.message for i in report.issues}
    assert msg["missing_frames", 3].startswith("missing frame_1 (of frame_0..frame_2)")
    assert "44100 Hz" in msg["sample_rate", 5]
    assert "2 channels" in msg["multichannel", 6]
    assert "1.000 s" in msg["short_audio", 7]
    assert "/m/nope" in msg["unknown_label", 8] and "/m/syn001" not in msg["unknown_label", 8]
    assert "entry 6" in msg["duplicate_id", 9]
    assert report.audio_info[5] == (44100, 1, int(SECONDS * 44100))
    assert report.audio_info[6] == (SR, 2, int(SECONDS * SR)) and report.audio_info[0] is None

    assert run_cli(data / "mixed.json") == 1
    out = capsys.readouterr().out
    assert f"ERROR missing_media video_id={frames[0].video_id} file={wav[0]}: " in out
    assert f"WARNING multichannel video_id={test[0].video_id} file={test_wav[0]}: " in out
    assert "errors: 9 (duplicate_id 1, empty_labels 1, missing_frames 1, missing_media 2" in out
    assert "warnings: 5 (cpu_undecodable 1, multichannel 2, sample_rate 1, short_audio 1)" in out


def test_wav_without_video_stream_as_video(data: Path) -> None:
    e = read_dataset(data / "train_webm.json")[0]
    shutil.copy(e.wav, e.video_path)  # a wav under a .webm name: opens, but has no video
    write_dataset(data / "one.json", [e])
    issues = run_check(data / "one.json").issues
    assert [(i.kind, i.file) for i in issues] == [("unreadable_media", e.video_path)]
    assert "no video stream" in issues[0].message


def test_strict_exit_codes(data: Path) -> None:
    entries = read_dataset(data / "train.json")
    write_wav(Path(entries[2].wav), SECONDS, channels=2)
    assert run_cli(data / "train.json") == 0  # warnings only
    assert run_cli(data / "train.json", "--strict") == 1
    Path(entries[3].wav).unlink()
    assert run_cli(data / "train.json") == 1


def test_malformed_json_exits_2_naming_the_file(data: Path) -> None:
    bad = data / "bad.json"
    bad.write_text('{"data": [{"video_id": "a", "wav": ')
    cmd = [sys.executable, "-m", "equiav.data.check", str(bad)]
    cmd += ["--label-csv", str(data / "class_labels_indices.csv"), "--no-cache"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 2
    assert str(bad) in res.stderr and "not valid JSON" in res.stderr
    with pytest.raises(DatasetError, match="bad.json"):
        run_check(bad)
    # A weights file that does not match the list is fatal too.
    assert run_cli(data / "test.json", "--weights", str(data / "weights.csv")) == 2


def test_write_clean_keeps_weights_in_step(data: Path, tmp_path: Path) -> None:
    src = data / "train.json"
    entries = list(read_dataset(src))
    Path(entries[1].wav).unlink()
    entries[3] = dataclasses.replace(entries[3], labels=("/m/unknown",))
    write_dataset(src, entries)
    weights = read_weights(data / "weights.csv")

    out = tmp_path / "clean" / "train.json"
    code = run_cli(src, "--weights", str(data / "weights.csv"), "--write-clean", str(out))
    assert code == 1
    kept = read_dataset(out)
    assert kept == [entries[i] for i in (0, 2, 4, 5)]
    assert np.array_equal(read_weights(out.parent / "weights.csv"), weights[[0, 2, 4, 5]])
    doc = json.loads(out.read_text())
    assert all(os.path.isabs(d["wav"]) for d in doc["data"])  # another folder: absolute paths
    assert run_check(out, data / "class_labels_indices.csv").issues == []

    # Next to the source: relative paths, and the weights file must be named; without --weights
    # they are recomputed over the kept entries.
    assert run_cli(src, "--write-clean", str(data / "clean.json")) == 2
    w_out = data / "clean_weights.csv"
    run_cli(src, "--write-clean", str(data / "clean.json"), "--clean-weights", str(w_out))
    doc = json.loads((data / "clean.json").read_text())
    assert [d["wav"] for d in doc["data"]] == [os.path.relpath(e.wav, data) for e in kept]
    expected = compute_weights([e.labels for e in kept])
    assert np.array_equal(read_weights(w_out), expected)
    assert not np.allclose(expected, weights[[0, 2, 4, 5]])  # recomputing is a real difference


def test_parsed_list_is_cached_beside_the_check(data: Path, monkeypatch) -> None:
    """A long list is parsed once: later checks load the table from its .npz; a rewritten
    JSON, or a damaged cache file, is read from the JSON again."""
    src = data / "train.json"
    first = run_check(src, use_cache=True)
    (npz,) = (data / ".equiav-cache").glob("entries-train-*.npz")

    def no_parse(path):
        raise AssertionError(f"parsed {path} again")

    with monkeypatch.context() as m:
        m.setattr(check, "read_dataset", no_parse)
        again = run_check(src, use_cache=True)
    assert list(again.entries) == list(first.entries) == list(read_dataset(src))
    entries = list(read_dataset(src))
    write_dataset(src, entries[:4])  # rewritten: another size and mtime
    assert len(run_check(src, use_cache=True).entries) == 4
    npz.write_bytes(b"not a zip")
    assert len(run_check(src, use_cache=True).entries) == 4


def test_trusted_cache_is_taken_without_stat(data: Path, monkeypatch) -> None:
    """``trust_cache`` (ranks after the first, once rank 0 has checked): a matching cache's
    results are taken as they are, no media file is stat-ed; without a cache it checks."""
    src = data / "train.json"
    cold = run_check(src, use_cache=True, trust_cache=True)  # no cache yet: a full check
    assert (cold.from_cache_count, cold.checked_count) == (0, 6)
    Path(read_dataset(src)[2].wav).unlink()  # what a re-stat would notice
    stats = []
    monkeypatch.setattr(check, "_stat", lambda path: stats.append(path))
    trusted = run_check(src, use_cache=True, trust_cache=True)
    assert (trusted.from_cache_count, trusted.checked_count) == (6, 0) and stats == []
    assert trusted.issues == [] and trusted.audio_info == cold.audio_info
    monkeypatch.undo()
    verified = run_check(src, use_cache=True)
    assert [(i.kind, i.index) for i in verified.issues] == [("missing_media", 2)]


def test_cache_reuse_and_invalidation(data: Path, tmp_path: Path, monkeypatch) -> None:
    src = data / "train.json"
    first = run_check(src, use_cache=True)
    assert (first.from_cache_count, first.checked_count) == (0, 6)
    cache = Path(first.cache_path)
    assert cache.parent == data / ".equiav-cache" and cache.name.startswith("check-train-")

    second = run_check(src, use_cache=True)
    assert (second.from_cache_count, second.checked_count) == (6, 0)
    assert second.issues == [] and second.audio_info == first.audio_info

    # A media file rewritten: only its entry is read again, and its new warning shows.
    entries = read_dataset(src)
    write_wav(Path(entries[4].wav), SECONDS, channels=2)
    third = run_check(src, use_cache=True)
    assert (third.from_cache_count, third.checked_count) == (5, 1)
    assert [(i.kind, i.index) for i in third.issues] == [("multichannel", 4)]
    assert third.audio_info[4] == (SR, 2, int(SECONDS * SR))
    fourth = run_check(src, use_cache=True)
    assert fourth.from_cache_count == 6 and [i.kind for i in fourth.issues] == ["multichannel"]

    # A cached finding is kept until its file changes; a deleted file is noticed.
    Path(entries[4].wav).unlink()
    fifth = run_check(src, use_cache=True)
    assert fifth.checked_count == 1 and [i.kind for i in fifth.issues] == ["missing_media"]

    # Other parameters or mode: another cache; a changed JSON: everything is read again.
    assert run_check(src, use_cache=True, deep=True).from_cache_count == 0
    write_dataset(src, entries[:5])
    assert run_check(src, use_cache=True).checked_count == 5

    # An unwritable dataset folder cache: falls back to $XDG_CACHE_HOME/equiav.
    shutil.rmtree(data / ".equiav-cache")
    (data / ".equiav-cache").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    sixth = run_check(src, use_cache=True)
    assert Path(sixth.cache_path).parent == tmp_path / "xdg" / "equiav"
    assert run_check(src, use_cache=True).from_cache_count == 5


def test_deep_finds_what_headers_hide(data: Path) -> None:
    src = data / "train_webm.json"
    entries = list(read_dataset(src))
    frames = read_dataset(data / "train.json")
    wav0 = Path(entries[0].wav)
    wav0.write_bytes(wav0.read_bytes()[: 44 + 30000])  # header intact, data chunk cut short
    x = np.random.default_rng(0).standard_normal(int(SECONDS * SR)).astype(np.float32) * 0.1
    sf.write(entries[1].wav, x, SR, subtype="FLOAT")
    with open(entries[1].wav, "r+b") as f:  # garble the tail: 0xFF bytes are NaN floats
        f.seek(-400, os.SEEK_END)
        f.write(b"\xff" * 400)
    sf.write(entries[2].wav, np.zeros(int(SECONDS * SR), np.int16), SR)  # silence
    webm3 = Path(entries[3].video_path)
    webm3.write_bytes(webm3.read_bytes()[: webm3.stat().st_size // 2])  # truncated video
    jpg = Path(frames[4].frame_path(2))
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])  # truncated JPEG body
    entries[4] = frames[4]
    write_dataset(src, entries)

    fast = run_check(src)
    assert fast.errors() == []
    assert [(i.kind, i.index) for i in fast.issues] == [("short_audio", 0)]

    deep = run_check(src, deep=True)
    assert found(deep) == {
        ("error", "corrupt_media", 0, str(wav0)),
        ("warning", "short_audio", 0, str(wav0)),
        ("error", "corrupt_media", 1, entries[1].wav),
        ("warning", "silent_audio", 2, entries[2].wav),
        ("error", "corrupt_media", 3, str(webm3)),
        ("error", "corrupt_media", 4, str(jpg)),
    }
    assert deep.usable == [2, 5]
    msg = {(i.kind, i.index): i.message for i in deep.issues}
    assert "declares" in msg["corrupt_media", 0]
    assert "non-finite" in msg["corrupt_media", 1]
    assert "decoded" in msg["corrupt_media", 3]
    assert "truncated" in msg["corrupt_media", 4]


def test_process_pool_matches_inline(data: Path, monkeypatch) -> None:
    src = data / "train_webm.json"
    Path(read_dataset(src)[3].wav).unlink()
    inline = run_check(src, workers=1)
    # 3 chunks over 2 spawned worker processes, for the check and for the cache's stat pass.
    monkeypatch.setattr(check, "CHUNK", 2)
    monkeypatch.setattr(check, "CHUNK_STAT", 2)
    pooled = run_check(src, workers=2, use_cache=True)
    assert pooled.checked_count == 6
    assert pooled.issues == inline.issues and len(inline.issues) == 1
    assert pooled.audio_info == inline.audio_info and pooled.video_codec == inline.video_codec
    Path(read_dataset(src)[3].wav).write_bytes(b"RIFF")
    again = run_check(src, workers=2, use_cache=True)
    assert (again.from_cache_count, again.checked_count) == (5, 1)
    assert [(i.kind, i.index) for i in again.issues] == [("unreadable_media", 3)]
