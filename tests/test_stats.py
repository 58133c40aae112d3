"""Tests of ``equiav.data.stats``: fbank statistics through the loader against a direct computation
(torchaudio's Kaldi fbank of the same wavs, zero-padded to 1024 frames, numpy mean/std), and the
preset it writes, read back by ``equiav.config.parse_args``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from equiav.config import load_yaml, parse_args
from equiav.data.index import read_dataset, read_label_csv
from equiav.data.stats import FbankStats, fbank_stats, main, sample_entries, write_preset
from tests.signals import kaldi_fbank

SAMPLES, SEED = 4, 1
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from equiav.data.synth import generate

    out = tmp_path_factory.mktemp("stats_synth")
    return generate(out, clips=8, classes=3, seed=0, video_format=("frames",), seconds=4.0,
                    workers=1)  # fmt: skip


def reference_stats(wavs: list[str], frames: int = 1024) -> tuple[float, float]:
    """The spec's fbank (torchaudio Kaldi) of each wav, mean removed first, zero-padded after the
    log to ``frames``; mean and (population) std of all values."""
    feats = []
    for path in wavs:
        x, rate = sf.read(path, dtype="float32")
        w = torch.from_numpy(x - x.mean())[None]
        f = kaldi_fbank(w, rate)
        feats.append(torch.nn.functional.pad(f, (0, 0, 0, frames - f.shape[0])).numpy())
    all_values = np.stack(feats).astype(np.float64)
    return float(all_values.mean()), float(all_values.std())


def test_stats_match_a_direct_fbank_computation(synth):
    entries = read_dataset(synth.datasets["train"])
    picked = sample_entries(entries, SAMPLES, SEED)
    assert len(picked) == SAMPLES and len(entries) > SAMPLES
    assert sample_entries(entries, SAMPLES, SEED) == picked  # seeded
    assert sample_entries(entries, SAMPLES, SEED + 1) != picked
    # Batch 3 over 4 clips: the eval loader pads the last batch; padding must not count.
    stats = fbank_stats(picked, read_label_csv(synth.label_csv), batch_size=3, frames_per_clip=4)
    mean, std = reference_stats([e.wav for e in picked])
    assert stats.clips == SAMPLES and stats.values == SAMPLES * 1024 * 128
    assert stats.mean == pytest.approx(mean, abs=1e-4)
    assert stats.std == pytest.approx(std, abs=1e-4)
    # The zero padding is part of the statistics (398 of 1024 frames are audio here).
    unpadded, _ = reference_stats([e.wav for e in picked], frames=398)
    assert abs(stats.mean - unpadded) > 1.0


def test_cli_writes_an_overlay_that_config_loads(synth, tmp_path, capsys):
    preset = tmp_path / "stats.yaml"
    argv = [str(synth.datasets["train"]), "--label-csv", str(synth.label_csv),
            "--samples", str(SAMPLES), "--seed", str(SEED), "--seconds", "4",
            "--frames-per-clip", "4", "--batch-size", "2", "--device", "cpu", "--no-progress",
            "--write-preset", str(preset)]  # fmt: skip
    assert main(argv) == 0
    picked = sample_entries(read_dataset(synth.datasets["train"]), SAMPLES, SEED)
    mean, std = reference_stats([e.wav for e in picked])
    cfg, rest = parse_args(["--config", str(preset)])
    assert rest == []
    assert cfg.data.audio_mean == pytest.approx(mean, abs=2e-4)  # 4 decimals written
    assert cfg.data.audio_std == pytest.approx(std, abs=2e-4)
    assert f"{cfg.data.audio_mean:.4f}" in capsys.readouterr().out


def test_merge_into_a_preset_keeps_its_keys_and_comments(tmp_path):
    stats = FbankStats(mean=-1.23456, std=2.5, clips=4, values=4 * 1024 * 128)
    original = REPO / "configs" / "demo.yaml"
    preset = tmp_path / "demo.yaml"
    preset.write_text(original.read_text())
    write_preset(preset, stats)
    before, after = load_yaml(original), load_yaml(preset)
    assert after["data"].pop("audio_mean") == -1.2346
    assert after["data"].pop("audio_std") == 2.5
    before["data"].pop("audio_mean", None)
    before["data"].pop("audio_std", None)
    assert after == before
    text = preset.read_text()
    assert "# A run that fits a CPU" in text and "# the label count is its row count" in text
    cfg, _ = parse_args(["--config", str(preset)])
    assert (cfg.data.audio_mean, cfg.data.audio_std, cfg.data.clip_seconds) == (-1.2346, 2.5, 4.0)

    # No data section yet, a data section without these keys, and a flow-style one.
    for text, kept in (
        ("train:\n  batch_size: 8\n", ("train", "batch_size", 8)),
        ("data:\n  dataset: VGGSound  # 309 classes\nmodel:\n  depth: 2\n", ("model", "depth", 2)),
        ("data: {dataset: VGGSound}\n", ("data", "dataset", "VGGSound")),
    ):
        preset.write_text(text)
        write_preset(preset, stats)
        doc = load_yaml(preset)
        assert doc["data"]["audio_mean"] == -1.2346 and doc["data"]["audio_std"] == 2.5
        assert doc[kept[0]][kept[1]] == kept[2]
        assert set(doc["data"]) <= {"dataset", "audio_mean", "audio_std"}
        if "#" in text:
            assert "# 309 classes" in preset.read_text()  # edited in place, comment kept
        parse_args(["--config", str(preset)])
