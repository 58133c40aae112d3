"""Write the decoded frame the pipelines would use for clip second k, as a PNG.

    python -m dali_pipelines.frame VIDEO_OR_FRAMES_DIR --second K [--video-id ID] OUT.png

For a frames folder (the CAV-MAE layout) the frame is ``{DIR}/frame_{K}/{ID}.jpg`` (``--video-id``
required); for a video file it is the frame on screen at K + 0.5 s. The frame is decoded by a small
DALI pipeline built from the same functions as the training pipelines (``dali_pipelines.video``),
on the GPU when torch sees one (``--device auto``, the default) and in DALI's CPU-only mode
otherwise, and written before any resizing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np
from nvidia.dali import fn, pipeline_def

from dali_pipelines.video import (
    check_decodable,
    clip_second,
    decode_jpeg,
    decode_video_frame,
    frame_index_at,
    video_frame_times,
)
from equiav.data.index import frame_path


def _resolve(path: str, k: int, video_id: str | None) -> tuple[str, int | None]:
    """(file to decode, frame index for a video or None for a JPEG), with checks naming the file."""
    if k < 0:
        raise ValueError(f"--second must be >= 0, got {k}")
    if os.path.isdir(path):
        if not video_id:
            raise ValueError(f"{path} is a frames folder: --video-id is required")
        jpeg = frame_path(path, video_id, k)
        if not os.path.isfile(jpeg):
            raise FileNotFoundError(
                f"frame file not found: {jpeg} (no frame for second {k} of {video_id} in {path})"
            )
        return jpeg, None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file or frames folder not found: {path}")
    times = video_frame_times(path)
    period = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
    duration = float(times[-1]) + period
    if clip_second(k) > duration:
        raise ValueError(
            f"second {k} ({clip_second(k)} s) is past the end of {path} "
            f"({len(times)} frames, {duration:.3f} s)"
        )
    return path, frame_index_at(path, clip_second(k))


@pipeline_def(batch_size=1, num_threads=1)
def _frame_pipeline(encoded: np.ndarray, frame_index: int | None, device: str):
    if frame_index is None:
        data = fn.external_source(source=lambda: [encoded])
        return decode_jpeg(data, device)
    index = np.asarray(frame_index, dtype=np.int32)
    data, index_node = fn.external_source(source=lambda: ([encoded], [index]), num_outputs=2)
    return decode_video_frame(data, index_node, device)


def decode_frame(
    path: str | os.PathLike, k: int, video_id: str | None = None, gpu: bool | None = None
) -> np.ndarray:
    """The HWC uint8 RGB frame for clip second ``k`` of a video file or frames folder.

    ``gpu=None`` uses the GPU when torch sees one. Raises FileNotFoundError, ValueError (second
    out of range, missing video id) or VideoCodecError, each naming the file.
    """
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    source, frame_index = _resolve(os.fspath(path), k, video_id)
    if frame_index is not None:
        check_decodable(source, gpu=gpu)
    pipe = _frame_pipeline(
        encoded=np.fromfile(source, dtype=np.uint8),
        frame_index=frame_index,
        device="gpu" if gpu else "cpu",
        device_id=0 if gpu else None,
    )
    pipe.build()
    (out,) = pipe.run()
    if gpu:
        out = out.as_cpu()
    return np.array(out[0])


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 with a message on bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m dali_pipelines.frame",
        description="Write the decoded RGB frame the pipeline uses for clip second K as a PNG.",
    )
    parser.add_argument("source", help="video file, or frames folder ({DIR}/frame_{K}/{ID}.jpg)")
    parser.add_argument("--second", type=int, required=True, help="clip second k (frame_{k})")
    parser.add_argument("--video-id", default=None, help="clip id (required for a frames folder)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "gpu"), default="auto", help="decode device"
    )
    parser.add_argument("out", help="output PNG path")
    args = parser.parse_args(argv)

    gpu = None if args.device == "auto" else args.device == "gpu"
    try:
        frame = decode_frame(args.source, args.second, args.video_id, gpu=gpu)
    except (FileNotFoundError, ValueError) as err:  # VideoCodecError is a ValueError
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1

    from PIL import Image

    Image.fromarray(frame).save(args.out, format="PNG")
    print(f"wrote {args.out} ({frame.shape[1]}x{frame.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
