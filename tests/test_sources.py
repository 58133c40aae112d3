"""Sample order, sharding and the byte-level checks of ``dali_pipelines.sources`` (no DALI run)."""

import numpy as np
import pytest

from dali_pipelines.sources import (
    CorruptMediaError,
    Shard,
    epoch_order,
    eval_positions,
    frame_draws,
    train_positions,
    validate_jpeg,
    validate_wav,
)


@pytest.mark.parametrize("n,batch,world", [(100, 4, 2), (37, 3, 2), (64, 8, 1), (50, 2, 4)])
def test_train_shards_cover_an_epoch_once(n, batch, world):
    parts = [train_positions(n, batch, Shard(r, world), seed=3, epoch=1) for r in range(world)]
    joined = np.concatenate(parts)
    global_batch = batch * world
    assert all(len(p) == n // global_batch * batch for p in parts)
    assert len(set(joined.tolist())) == len(joined)  # no sample twice within an epoch
    # Exactly the epoch's order without its incomplete tail, interleaved across ranks.
    order = epoch_order(n, seed=3, epoch=1)[: n // global_batch * global_batch]
    assert sorted(joined.tolist()) == sorted(order.tolist())
    np.testing.assert_array_equal(parts[0], order[0::world])


def test_epochs_reshuffle_and_repeat_under_a_seed():
    a0 = train_positions(100, 4, Shard(), seed=0, epoch=0)
    assert not np.array_equal(a0, train_positions(100, 4, Shard(), seed=0, epoch=1))
    assert not np.array_equal(a0, train_positions(100, 4, Shard(), seed=1, epoch=0))
    np.testing.assert_array_equal(a0, train_positions(100, 4, Shard(), seed=0, epoch=0))


def test_start_offset_continues_the_global_order_on_another_world_size():
    n, batch = 96, 4
    full = epoch_order(n, seed=5, epoch=2)
    # 2 processes ran 3 steps (24 samples); 3 processes continue from there.
    rest = [train_positions(n, batch, Shard(r, 3), 5, 2, start_offset=24) for r in range(3)]
    np.testing.assert_array_equal(np.sort(np.concatenate(rest)), np.sort(full[24:]))


@pytest.mark.parametrize("n,batch,world", [(10, 4, 1), (10, 4, 3), (7, 2, 2), (1, 4, 2)])
def test_eval_positions_visit_every_entry_once(n, batch, world):
    seen = []
    lengths = set()
    for r in range(world):
        pos, valid = eval_positions(n, batch, Shard(r, world))
        assert len(pos) % batch == 0
        lengths.add(len(pos))
        seen += pos[valid == 1].tolist()
    assert sorted(seen) == list(range(n))
    assert len(lengths) == 1  # every rank runs the same number of batches


def test_weighted_draws_follow_the_weights():
    w = np.array([1.0, 3.0, 6.0])
    counts = np.zeros(3)
    for epoch in range(3000):
        counts += np.bincount(epoch_order(3, 0, epoch, weights=w), minlength=3)
    np.testing.assert_allclose(counts / counts.sum(), w / w.sum(), atol=0.02)


def test_frame_draws_are_uniform_and_repeatable():
    ks = np.array([frame_draws(0, 1, p, 2, 10) for p in range(5000)])
    assert ks.tolist() == [frame_draws(0, 1, p, 2, 10) for p in range(5000)]
    for view in range(2):
        counts = np.bincount(ks[:, view], minlength=10)
        assert counts.min() > 400 and counts.max() < 600
    # The views draw independently: equal in about a tenth of the samples.
    assert abs((ks[:, 0] == ks[:, 1]).mean() - 0.1) < 0.02
    assert ks[:, 0].tolist() != [frame_draws(0, 2, p, 2, 10)[0] for p in range(5000)]


def _wav_bytes(tmp_path, seconds=0.1):
    import soundfile

    path = tmp_path / "a.wav"
    soundfile.write(path, np.zeros(int(16000 * seconds), np.float32), 16000, subtype="PCM_16")
    return path, np.fromfile(path, np.uint8)


def test_validate_wav_accepts_a_real_file_and_names_broken_ones(tmp_path):
    path, data = _wav_bytes(tmp_path)
    validate_wav(str(path), data)
    with pytest.raises(CorruptMediaError, match="a.wav: truncated"):
        validate_wav(str(path), data[: len(data) // 2])
    with pytest.raises(CorruptMediaError, match="not a RIFF"):
        validate_wav(str(path), np.frombuffer(b"garbage" * 20, np.uint8))


def test_validate_jpeg(tmp_path):
    from PIL import Image

    path = tmp_path / "f.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    data = np.fromfile(path, np.uint8)
    validate_jpeg(str(path), data)
    with pytest.raises(CorruptMediaError, match="f.jpg: truncated JPEG"):
        validate_jpeg(str(path), data[:-10])
    with pytest.raises(CorruptMediaError, match="not a JPEG"):
        validate_jpeg(str(path), data[5:])
