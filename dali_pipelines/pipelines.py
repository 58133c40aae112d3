"""One DALI pipeline definition per mode, sharing the decode and feature stages.

Modes:

- ``eval``: no augmentation, frame k = ``eval_frame``, every sample exactly once (``valid`` marks
  the padding rows of the last batch).
- ``train``: the epoch's seeded order and sharding (``sources``), a frame k drawn per view, the
  clean audio and visual views. The augmenting modes (``pretrain``, ``finetune``) add their random
  draws on top of the same stages.

Every pipeline returns, by name (see ``OUTPUTS``): ``wave`` (B, N) float32 and ``wave_len`` (B,)
(the audio stage before the filterbank, which runs right after the iterator: see ``audio``),
``visual`` (B, 3, S, S) float32 normalised, ``labels`` (B, C) float32 multi-hot, ``index`` (B,)
entry indices, ``valid`` (B,) and ``frame_k`` (B, views).

The device follows the pipeline: ``device_id=None`` runs DALI's CPU-only mode, a device id makes
the image/video decoders "mixed" (nvJPEG, NVDEC) and the rest "gpu".
"""

from __future__ import annotations

from dataclasses import dataclass

from nvidia.dali import fn, pipeline_def
from nvidia.dali.pipeline import Pipeline

from dali_pipelines import audio, video
from dali_pipelines.sources import SampleSource

OUTPUTS = ("wave", "wave_len", "visual", "labels", "index", "valid", "frame_k")
MODES = ("eval", "train")


@dataclass(frozen=True)
class PipelineOptions:
    """Build-time knobs of a pipeline (shapes and resources; never data paths)."""

    batch_size: int
    num_threads: int = 2
    device_id: int | None = None
    prefetch: int = 2
    seed: int = 0
    sample_rate: int = audio.SAMPLE_RATE
    target_frames: int = audio.TARGET_FRAMES
    image_size: int = 224
    py_workers: int = 0  # >0: read files in that many Python worker processes


def _visual(frame_inputs: list, video_files: bool, image_size: int, device: str):
    """Decode one view's frame (JPEG bytes, or video bytes and a frame number); its clean view."""
    if video_files:
        frame = video.decode_video_frame(frame_inputs[0], frame_inputs[1], device)
    else:
        frame = video.decode_jpeg(frame_inputs[0], device)
    return video.clean_view(frame, device, image_size)


@pipeline_def
def _clean_pipeline(source: SampleSource, opts: PipelineOptions):
    """Clean views of one frame per sample: the ``eval`` and ``train`` modes."""
    device = "cpu" if opts.device_id is None else "gpu"
    wav, *frame_inputs, labels, index, valid, frame_k = fn.external_source(
        source=source,
        num_outputs=source.num_outputs,
        batch=False,
        parallel=opts.py_workers > 0,
    )
    wave, wave_len = audio.waveform(wav, opts.target_frames)
    if device == "gpu":
        wave = wave.gpu()
    visual = _visual(frame_inputs, source.video_files, opts.image_size, device)
    return wave, wave_len, visual, labels, index, valid, frame_k


def build_pipeline(mode: str, source: SampleSource, opts: PipelineOptions) -> Pipeline:
    """Build (not yet run) the pipeline of ``mode``."""
    if mode not in MODES:
        raise ValueError(f"unknown pipeline mode {mode!r}; expected one of {MODES}")
    if (mode == "eval") != (source.spec.mode == "eval"):
        raise ValueError(f"pipeline mode {mode!r} needs a source in matching mode")
    kwargs = {}
    if opts.py_workers > 0:
        kwargs = {"py_num_workers": opts.py_workers, "py_start_method": "spawn"}
    pipe = _clean_pipeline(
        source,
        opts,
        batch_size=opts.batch_size,
        num_threads=opts.num_threads,
        device_id=opts.device_id,
        seed=opts.seed,
        prefetch_queue_depth=opts.prefetch,
        **kwargs,
    )
    pipe.build()
    return pipe
