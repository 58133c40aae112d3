"""One DALI pipeline per mode, sharing the decode and feature stages.

Modes (the source's, see ``sources.SourceSpec``):

- ``eval``: no augmentation, frame k = ``eval_frame``, every sample exactly once (``valid`` marks
  the padding rows of the last batch).
- ``train``: the epoch's seeded order and sharding, a random frame k, the clean views.
- ``pretrain``: as ``train``, plus the augmented visual view from its own frame draw, cropped and
  resized here with the crop the source drew (the rest of its augmentation, and all of the
  audio's, runs on the filterbank and the image right after the iterator: ``loader``), plus the
  t-vectors.
- ``finetune``: the sample's and its mixup partner's waveforms mixed before the filterbank and
  their clean frames mixed after normalisation.

Outputs by name (``output_names(source)``): ``wave`` (B, N) float32 and ``wave_len`` (B,) (the
audio stage before the filterbank, see ``audio``), ``visual`` (B, 3, S, S) float32 normalised,
``meta`` (B, M) float64: the source's small outputs packed (``labels``, ``index``, ``valid``,
``frame_k``, ``skipped`` and the mode's draws: ``t_a``, ``t_v``, ``a_params`` (+ ``t_a_cen``,
``t_v_cen``) for pretraining, ``ft_params`` for finetuning), which
``SampleSource.unpack`` splits on the host; and for pretraining ``visual_aug`` (B, 3, S, S) in
[0, 1].

The device follows the pipeline: ``device_id=None`` runs DALI's CPU-only mode, a device id makes
the image/video decoders "mixed" (nvJPEG, NVDEC) and the rest "gpu".
"""

from __future__ import annotations

from dataclasses import dataclass

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from dali_pipelines import audio, video
from dali_pipelines.sources import SampleSource


@dataclass(frozen=True)
class PipelineOptions:
    """Build-time knobs of a pipeline (shapes and resources; never data paths)."""

    batch_size: int
    num_threads: int = 2
    device_id: int | None = None
    prefetch: int = 2
    seed: int = 0
    target_frames: int = audio.TARGET_FRAMES
    image_size: int = 224
    py_workers: int = 0  # >0: read files in that many Python worker processes
    video_device: str = "gpu"  # with a device id: decode video files there ("cpu" or "gpu")
    hw_decoder_load: float = 0.65  # on a GPU: JPEG frames to the hardware decoder (nvJPEG)


def output_names(source: SampleSource) -> tuple[str, ...]:
    """Names of the pipeline's outputs, in order, for the source's mode."""
    names = ("wave", "wave_len", "visual", "meta")
    return names + ("visual_aug",) if source.spec.mode == "pretrain" else names


def _decode(src: dict, view: int, video_files: bool, device: str, opts: PipelineOptions):
    """Decode one view's frame on ``device``: JPEG bytes, or video bytes and a frame number
    (decoded on ``opts.video_device``, then moved to ``device``)."""
    video_device = "cpu" if device == "cpu" else opts.video_device
    if video_files:  # a view without its own bytes is a frame of view 0's file (pretraining)
        data = src.get(f"frame{view}", src["frame0"])
        frame = video.decode_video_frame(data, src[f"frame{view}_index"], video_device)
        return frame.gpu() if video_device != device else frame
    return video.decode_jpeg(src[f"frame{view}"], device, opts.hw_decoder_load)


def _augmented_crop(frame, crop, image_size: int, device: str):
    """The pretraining visual crop (i, j, h, w drawn by the source), resized to the output size
    with antialiased bilinear interpolation, as float CHW in [0, 1].

    Cropped first, then resized (as torchvision's ``resized_crop``): resizing a region of interest
    instead would let the antialiasing filter read pixels outside the crop at its borders.
    """
    crop = fn.cast(crop, dtype=types.FLOAT)
    cropped = fn.slice(
        frame,
        fn.stack(crop[0], crop[1]),
        fn.stack(crop[2], crop[3]),
        axes=[0, 1],
        normalized_anchor=False,
        normalized_shape=False,
        device=device,
    )
    resized = fn.resize(
        cropped,
        device=device,
        size=[image_size, image_size],
        interp_type=types.INTERP_LINEAR,
        antialias=True,
        dtype=types.FLOAT,
    )
    return fn.crop_mirror_normalize(
        resized, device=device, dtype=types.FLOAT, output_layout="CHW", mean=[0.0], std=[255.0]
    )


@pipeline_def
def _pipeline(source: SampleSource, opts: PipelineOptions):
    device = "cpu" if opts.device_id is None else "gpu"
    vdev = "cpu" if device == "cpu" else opts.video_device
    mode = source.spec.mode
    names = source.feed_names
    nodes = fn.external_source(
        source=source, num_outputs=len(names), batch=False, parallel=opts.py_workers > 0
    )
    src = dict(zip(names, nodes, strict=True))
    # The packed numbers the graph itself reads, as their own per-sample tensors.
    for name in ("frame0_index", "frame1_index", "vcrop", "lam"):
        if name in source.meta_layout:
            offset, shape, dtype = source.meta_layout[name]
            field = src["meta"][offset] if shape == () else src["meta"][offset : offset + shape[0]]
            src[name] = fn.cast(field, dtype=types.to_dali_type(dtype))
    if mode == "finetune":
        wave, wave_len = audio.mixed_waveform(
            src["wav"], src["wav_partner"], src["lam"], opts.target_frames
        )
    else:
        wave, wave_len = audio.waveform(src["wav"], opts.target_frames)
    if device == "gpu":
        wave = wave.gpu()
    aug_frame = None  # pretraining's augmented view, from its own frame draw
    if mode == "pretrain" and source.video_files and vdev == "cpu":
        # The two views are frames of the same file: decode it once.
        indices = fn.stack(src["frame0_index"], src["frame1_index"])
        frame, aug_frame = video.decode_video_frames(src["frame0"], indices, 2, vdev)
        if device == "gpu":
            frame, aug_frame = frame.gpu(), aug_frame.gpu()
    else:
        frame = _decode(src, 0, source.video_files, device, opts)
        if mode == "pretrain":
            aug_frame = _decode(src, 1, source.video_files, device, opts)
    visual = video.clean_view(frame, device, opts.image_size)
    if mode == "finetune":  # frames mixed after normalisation, as the original does
        partner = video.clean_view(
            _decode(src, 1, source.video_files, device, opts), device, opts.image_size
        )
        lam = src["lam"].gpu() if device == "gpu" else src["lam"]
        visual = visual * lam + partner * (1.0 - lam)
    outputs = [wave, wave_len, visual, src["meta"]]
    if mode == "pretrain":
        outputs.append(_augmented_crop(aug_frame, src["vcrop"], opts.image_size, device))
    return tuple(outputs)


def build_pipeline(source: SampleSource, opts: PipelineOptions) -> Pipeline:
    """Build (not yet run) the pipeline of the source's mode."""
    kwargs = {}
    if opts.py_workers > 0:
        kwargs = {"py_num_workers": opts.py_workers, "py_start_method": "spawn"}
    pipe = _pipeline(
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
