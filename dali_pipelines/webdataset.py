"""DALI's own ``fn.readers.webdataset`` over the shards of ``equiav.data.shard``.

``webdataset_reader`` builds a sequential, eval-order pipeline: the shards' clips in order, split
over ranks as DALI splits a reader (rank ``r`` of ``W`` reads the contiguous part
``[N r / W, N (r + 1) / W)``), using the ``.idx`` files we write. It yields each clip's wav bytes,
its eval frame's JPEG bytes (or its video file's bytes), its ``.json`` member, and, through the
same stage functions as the training pipelines, the waveform and (frames layout) the clean view.
It shows that the shards are standard WebDataset that DALI reads as they are, and suits a plain
sequential pass (inference, feature extraction) at the reader's full streaming speed.

Why training does not use it: the training source (``sources.SampleSource``) must choose every
sample by position, which a sequential reader cannot do:

- exact resume and world-size changes: the epoch's order is a pure function of (seed, epoch) and
  a run continues at a global position, on any number of processes; the reader's shuffle is a
  local buffer whose state is lost with the process (and its order depends on the shard split);
- class-balanced sampling draws entries with replacement, which a reader that visits each sample
  once per epoch cannot express;
- pretraining reads two independently drawn frames of the same clip, and finetuning's mixup
  partner is drawn from the whole dataset: both are random access, not the next sample;
- a frame k drawn per sample means reading one of ten JPEGs; the reader would read all ten.

So training reads shards through ``equiav.data.media``: each member by its (offset, size) from
the same ``.idx`` files, one ``pread`` each, in the order the source computes. The batches equal
the file layout's exactly (tests/test_shard.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from nvidia.dali import fn, pipeline_def
from nvidia.dali.pipeline import Pipeline

from dali_pipelines import audio, video
from dali_pipelines.sources import Shard
from equiav.data.shard import INDEX_NAME

READER = "reader"


def shard_files(shard_dir: str | Path) -> tuple[dict, list[str], list[str]]:
    """(``index.json``, shard paths, ``.idx`` paths) of a folder ``equiav.data.shard`` wrote."""
    shard_dir = Path(shard_dir)
    with open(shard_dir / INDEX_NAME, encoding="utf-8") as f:
        meta = json.load(f)
    tars = [str(shard_dir / s["file"]) for s in meta["shards"]]
    idxs = [str(shard_dir / s["index"]) for s in meta["shards"]]
    return meta, tars, idxs


def output_names(layout: str) -> tuple[str, ...]:
    """The reader pipeline's outputs: bytes of the wav, frame/video and json members, then the
    decoded waveform and its length, and the clean view in the frames layout."""
    names = ("wav", "media", "json", "wave", "wave_len")
    return names + ("visual",) if layout == "frames" else names


@pipeline_def
def _reader_pipeline(tars, idxs, exts, shard: Shard, frames: bool, image_size, target_frames):
    wav, media, meta = fn.readers.webdataset(
        paths=tars,
        index_paths=idxs,
        ext=exts,
        missing_component_behavior="error",
        shard_id=shard.rank,
        num_shards=shard.world_size,
        random_shuffle=False,
        pad_last_batch=True,
        name=READER,
    )
    wave, wave_len = audio.waveform(wav, target_frames)
    outputs = [wav, media, meta, wave, wave_len]
    if frames:
        outputs.append(video.clean_view(video.decode_jpeg(media, "cpu"), "cpu", image_size))
    return tuple(outputs)


def webdataset_reader(
    shard_dir: str | Path,
    *,
    batch_size: int,
    eval_frame: int = 5,
    shard: Shard | None = None,
    num_threads: int = 1,
    image_size: int = 224,
    target_frames: int = audio.TARGET_FRAMES,
) -> Pipeline:
    """A built CPU pipeline reading the shards under ``shard_dir`` in order (this rank's part).

    The wav must be at 16 kHz (the training source resamples other rates; this reader does not).
    """
    meta, tars, idxs = shard_files(shard_dir)
    frames = meta["layout"] == "frames"
    media = f"frame{eval_frame}.jpg" if frames else meta["layout"]
    pipe = _reader_pipeline(
        tars,
        idxs,
        ["wav", media, "json"],
        shard or Shard(),
        frames,
        image_size,
        target_frames,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=None,
    )
    pipe.build()
    return pipe


def read_epoch(pipe: Pipeline) -> Iterator[dict[str, np.ndarray]]:
    """This rank's samples of one pass, in order, as dicts of numpy arrays (padding dropped)."""
    meta = pipe.reader_meta(READER)
    n, rank, world = meta["epoch_size"], meta["shard_id"], meta["number_of_shards"]
    remaining = n * (rank + 1) // world - n * rank // world
    while remaining > 0:
        outs = pipe.run()
        names = output_names("frames")[: len(outs)]
        for i in range(min(remaining, len(outs[0]))):
            yield {name: np.array(out.at(i)) for name, out in zip(names, outs, strict=True)}
        remaining -= len(outs[0])
