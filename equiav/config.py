"""The one configuration system: plain dataclasses, YAML presets, `--set` overrides, paper flags.

A run's configuration is a `Config` made of seven sections (`data`, `augment`, `model`, `optim`,
`train`, `eval`, `quirks`), each a dataclass whose defaults are the paper's pretraining recipe
(see the spec's "Optimisation (paper defaults)"); `default_config("finetune")` gives the finetuning
recipe. On top of the defaults a command line applies, in this order:

1. every `--config FILE` (YAML, `section: {key: value}`), in the order given;
2. every `--set section.key=value` and every paper flag alias (`--lr 1e-4`, `--cen_mean False`,
   ...), in the order given.

Every value is type-checked against its field (int, float, bool, str, Optional, Literal, tuple,
list; strings from the command line are parsed), unknown keys are rejected with the valid keys of
their section, and cross-field rules are checked once at the end (`validate`). Paths in a YAML
file or on the command line are used as written: relative paths are relative to the current
working directory, not to the YAML file.

Dataset-derived values (`data.n_classes`, `data.audio_mean`, `data.audio_std`, `data.metric`) are
`None` by default, meaning "the dataset's": read them through `DataConfig.resolved_*()` or call
`resolve(cfg)` for a copy with them filled in (the synthetic dataset counts the rows of its label
CSV, so resolving it reads that file). `save_config` writes a YAML file that `--config` reads back
to an equal `Config`.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

logger = logging.getLogger(__name__)

DatasetName = Literal["synthetic", "AudioSet_2M", "AudioSet_20K", "VGGSound"]
Metric = Literal["mAP", "accuracy"]


class ConfigError(ValueError):
    """A configuration value, key or file that cannot be used; the message says which and why."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Dataset files, feature geometry and loader sizes."""

    dataset: DatasetName = "AudioSet_2M"
    train_json: str | None = None
    val_json: str | None = None  # the paper validates on its test list
    test_json: str | None = None
    retrieval_json: str | None = None
    label_csv: str | None = None
    weights_csv: str | None = None  # needed by train.bal
    # > 0: hold this fraction of train_json out for validation (takes precedence over val_json).
    val_fraction: float = 0.0
    n_classes: int | None = None  # None: the dataset's (synthetic: rows of label_csv)
    audio_mean: float | None = None  # None: the dataset's (synthetic must set it)
    audio_std: float | None = None
    metric: Metric | None = None  # None: the dataset's (synthetic: mAP)
    sample_rate: int = 16000
    clip_seconds: float = 10.0
    target_length: int = 1024  # fbank frames after pad/cut
    num_mel_bins: int = 128
    frames_per_clip: int = 10  # frame k sits at k + 0.5 s (frames layout: folder frame_k)
    eval_frame: int = 5
    image_size: int = 224
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    video_source: Literal["frames", "file"] = "frames"  # informational: which JSON variant
    num_threads: int = 2  # DALI CPU threads per process
    prefetch: int = 2  # DALI prefetch queue depth
    # >0: the per-sample source (file reads, augmentation draws) runs in that many worker
    # processes (DALI's parallel external source) instead of the training process's main thread.
    py_workers: int = 0
    # >0: DALI's next batch and the device stage run in a background thread of the training
    # process, this many batches ahead of the step (dali_pipelines.threaded).
    thread_prefetch: int = 0
    # CPU loaders: glibc keeps freed memory for reuse instead of returning it to the system, so
    # batch-sized tensors stop paying page faults every batch (dali_pipelines.loader).
    keep_freed_memory: bool = True
    # Where video files are decoded on a GPU machine: "auto" (DALI's CPU decoder on keyframe
    # excerpts when every codec of the list decodes there: VP8, VP9, MJPEG; else NVDEC), "cpu"
    # or "gpu" (dali_pipelines.loader.video_decoder_for). Without a GPU always the CPU.
    video_decoder: Literal["auto", "cpu", "gpu"] = "auto"
    # On a GPU, the share of JPEG frames nvJPEG sends to the GPU's hardware JPEG decoder
    # (A100, H100, H200) rather than its hybrid path (Huffman decoding on the CPU threads, the
    # rest in CUDA kernels beside the step): DALI's default 0.65 (fn.decoders.image).
    hw_decoder_load: float = 0.65
    # The device stage's Kaldi filterbank (kernels.fbank): "auto" (on a GPU the fastest measured
    # for the batch's size: our fused Triton kernel with tf32x3 dots for small batches, cuFFT
    # for large ones; on a CPU torch's), "triton-tf32x3" (that kernel with its dots on the tensor
    # cores, as accurate as IEEE: kernels/fbank.py), "triton" (IEEE dots), or "torch" (on a GPU
    # cuFFT and a dozen kernels). The Triton ones need a GPU.
    fbank_backend: Literal["auto", "torch", "triton", "triton-tf32x3"] = "auto"

    def resolved_n_classes(self) -> int:
        """Label count: `n_classes` if set, else the dataset's (synthetic: rows of `label_csv`)."""
        if self.n_classes is not None:
            return self.n_classes
        known = _DATASETS[self.dataset]["n_classes"]
        if known is not None:
            return known
        if self.label_csv is None:
            raise ConfigError(
                f"data.n_classes: dataset {self.dataset!r} takes its label count from "
                "data.label_csv, which is not set"
            )
        return count_labels(self.label_csv)

    def resolved_mean(self) -> float:
        """Fbank normalisation mean: `audio_mean` if set, else the dataset's."""
        return self._stat("audio_mean")

    def resolved_std(self) -> float:
        """Fbank normalisation standard deviation: `audio_std` if set, else the dataset's."""
        return self._stat("audio_std")

    def resolved_metric(self) -> str:
        """Model-selection metric: `metric` if set, else the dataset's ("mAP" or "accuracy")."""
        return self.metric if self.metric is not None else _DATASETS[self.dataset]["metric"]

    def _stat(self, name: str) -> float:
        value = getattr(self, name)
        if value is None:
            value = _DATASETS[self.dataset][name]
        if value is None:
            raise ConfigError(f"data.{name}: dataset {self.dataset!r} has no default; set it")
        return value


@dataclass
class AugmentConfig:
    """Pretraining augmentation draws and finetuning augmentations (spec: 'Pretraining
    augmentations', 'Optimisation')."""

    specaug_p: float = 0.8
    time_mask: int = 192
    freq_mask: int = 48
    audio_rrc_scale: tuple[float, float] = (0.08, 1.0)
    audio_rrc_ratio: tuple[float, float] = (0.1, 0.1875)  # w/h on the 1024 x 128 image
    visual_rrc_scale: tuple[float, float] = (0.08, 1.0)
    visual_rrc_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5
    gray_p: float = 0.2
    noise: bool = True  # training-time roll of the clean fbank along time (never in evaluation)
    # Finetuning.
    mixup: float = 0.5  # probability that a sample is mixed
    mixup_alpha: float = 10.0  # lambda ~ Beta(alpha, alpha)
    ft_freqm: int = 48
    ft_timem: int = 192


@dataclass
class ModelConfig:
    """Tower sizes (shared by the audio and visual towers), predictor, heads, checkpoints."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    aug_size_a: int = 24  # length of t_a: fixed by the augmentations we implement
    aug_size_v: int = 18
    aug_hidden: int = 256
    head_hidden: int = 2048
    head_out: int = 512
    predictor_heads: int = 8
    predictor_head_dim: int = 64
    cen_mean: bool = True
    cen_num: int = 16
    temperature: float = 0.07
    drop_path: float = 0.0  # finetuning: 0.1
    # The towers' MLP activation, exact GELU either way: "torch" (nn.GELU; inductor's kernels
    # when compiled), "triton" (kernels/gelu.py on CUDA: fewer instructions per element than
    # inductor's erf) or "triton-bias" (the same with fc1's bias: its add in the forward kernel,
    # its gradient summed in the backward kernel instead of a second pass over the gradient);
    # torch's GELU on the CPU. Weights and checkpoints are the same.
    gelu: Literal["torch", "triton", "triton-bias"] = "torch"
    # The towers' q, k, v projections: "packed" (timm's one GEMM) or "split" (three GEMMs on
    # thirds of the same weight, so that attention's gradients need no copy back into one
    # layout: equiav.model.vit.SplitQKVAttention). The same function and checkpoints.
    qkv: Literal["packed", "split"] = "packed"
    # The towers' linear layers (qkv, proj, fc1, fc2): "default" (the precision's GEMMs) or
    # "float8" (kernels/float8.py: every GEMM on float8 operands with one dynamic scale per
    # tensor, twice the tensor-core rate on Hopper; an opt-in that changes the numbers: not
    # the paper's training, its effect on the curves not measured). Same checkpoints.
    linear: Literal["default", "float8"] = "default"
    ftmode: Literal["multimodal", "audio_only", "video_only"] = "multimodal"
    ft_proj_dim: int = 512  # multimodal finetuning: Linear(embed_dim, 512) per modality
    pretrained_model: str | None = None  # EquiAV checkpoint to finetune / evaluate
    audio_pretrained_encoder: str | None = None  # MAE ViT-B checkpoint for the audio tower
    visual_pretrained_encoder: str | None = None


@dataclass
class OptimConfig:
    """AdamW and the warmup-cosine learning-rate schedule."""

    lr: float = 1e-4
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 2.0  # finetuning: 1
    warmup_start_lr: float = 2e-7
    min_lr: float = 1e-6
    max_epoch: int = 20  # finetuning: 50
    head_lr: float = 50.0  # lr multiplier for the layers created for finetuning
    grad_clip: float = 0.01  # gradient-norm clip; 0 turns clipping off
    fused: bool = True
    use_apex: bool = False


#: Modes of our own (``train.compile_mode``): torch.compile's options instead of one of its modes.
#: ``coordinate-descent``: the default mode plus inductor's coordinate-descent tuning of the
#: Triton kernels it generates (block sizes of the pointwise and reduction kernels, LayerNorm and
#: GELU among them, benchmarked at compile time); unlike ``max-autotune-no-cudagraphs`` no GEMM
#: autotuning, which took more than 200 s for the pretraining step on an H200 (and the
#: coordinate descent alone more than 300 s). ``gemm-autotune``: the default mode plus inductor's
#: GEMM autotuning alone (its Triton matmul templates against cuBLAS per shape, where a template
#: can take the pointwise work after it into its epilogue: fc1's GELU, 12 % of that step) without
#: the pointwise and reduction autotuning ``max-autotune-no-cudagraphs`` adds.
COMPILE_OPTIONS: dict[str, dict[str, object]] = {
    "coordinate-descent": {"coordinate_descent_tuning": True},
    "gemm-autotune": {"max_autotune_gemm": True},
}
#: torch.compile's modes and ours (``train.compile_mode``).
COMPILE_MODES = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
    *COMPILE_OPTIONS,
)


@dataclass
class TrainConfig:
    """The training loop: batch, precision, checkpoints, logging. The subcommand picks the mode."""

    batch_size: int = 16  # per process, as in the paper (finetuning: 32)
    # "bf16": autocast, float32 weights. "bf16-master": a bfloat16 model (weights, activations,
    # gradients) and float32 master weights in the optimiser: less memory traffic, checkpoints
    # still float32 (equiav.train.optim). "fp16": autocast and a GradScaler. "fp32".
    precision: Literal["bf16", "bf16-master", "fp16", "fp32"] = "bf16"
    compile: bool = False
    # torch.compile's mode: "default", "reduce-overhead" (CUDA graphs), "max-autotune" or
    # "max-autotune-no-cudagraphs" (Triton matmul templates tried per shape: long first step),
    # or one of ours, "coordinate-descent" or "gemm-autotune" (COMPILE_OPTIONS above).
    compile_mode: str = "default"
    channels_last: bool = False
    tf32: bool = True
    seed: int = 0
    save_path: str = "runs/default"
    ckpt_every_steps: int = 0  # 0: checkpoint at epoch ends only
    keep_last: int = 3
    resume: str | None = None  # a checkpoint path, or "auto": the latest under save_path
    log_every: int = 10
    max_nonfinite_in_row: int = 5  # stop after this many consecutive non-finite losses
    trainfunc_ft: Literal["BCE", "CE"] = "BCE"
    bal: bool = False  # class-balanced sampling from data.weights_csv
    max_steps: int | None = None  # stop early (demos, tests)
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    # "high-priority": on a GPU the step runs on a CUDA stream of the highest priority, so that
    # the GPU's block scheduler gives the loader's kernels (DALI's decoding, our filterbank and
    # augmentations, on streams of the lowest priority) only what the step leaves idle; the
    # measured cost of the loader's GPU work beside the step is the gap between DALI-fed and
    # step-only training (bench/GPU-SESSIONS.md). "default": torch's current stream. No-op on a
    # CPU.
    step_stream: Literal["default", "high-priority"] = "default"


@dataclass
class EvalConfig:
    """Evaluation during training and zero-shot retrieval."""

    every_epochs: int = 1
    batch_size: int | None = None  # None: train.batch_size
    retrieval_frame: int = 5  # the original's script asks for frame 10, which does not exist
    retrieval_seed: int = 0  # seeds the cen_num vectors when quirks.retrieval_seeded
    retrieval_ks: list[int] = field(default_factory=lambda: [1, 5, 10])


@dataclass
class QuirksConfig:
    """Every behaviour of the original code that we correct, in one place (spec: 'Paper-exact
    mode'). `configs/paper_exact.yaml` sets them back to the original's behaviour."""

    # Roll the augmented audio view along time (the original rolls the channel axis: a no-op
    # whose t_a still records a shift).
    time_shift_applied: bool = True
    # Apply finetuning SpecAugment (the original's key mismatch leaves its mask widths at 0).
    ft_specaug: bool = True
    # Gather other ranks' features with gradient for the inter-modal loss (the original: without).
    inter_gather_with_grad: bool = True
    # Seed the cen_num vectors used by retrieval (the original draws them unseeded).
    retrieval_seeded: bool = True
    # The original's audio_only head (a per-token Linear(768, 512) and then a 768-wide classifier)
    # cannot run, so there is nothing to switch back to: "linear" is the only value.
    audio_only_head: Literal["linear"] = "linear"


@dataclass
class Config:
    """A whole run's configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quirks: QuirksConfig = field(default_factory=QuirksConfig)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))

# Per-dataset facts (spec: 'Data', 'Audio features'). None: comes from the config / label CSV.
_DATASETS: dict[str, dict[str, Any]] = {
    "AudioSet_2M": {"n_classes": 527, "metric": "mAP", "audio_mean": -4.346, "audio_std": 4.332},
    "AudioSet_20K": {"n_classes": 527, "metric": "mAP", "audio_mean": -4.346, "audio_std": 4.332},
    "VGGSound": {"n_classes": 309, "metric": "accuracy", "audio_mean": -4.956, "audio_std": 4.486},
    "synthetic": {"n_classes": None, "metric": "mAP", "audio_mean": None, "audio_std": None},
}

# The finetuning recipe, where it differs from the pretraining defaults.
_FINETUNE_DEFAULTS: dict[str, Any] = {
    "optim.warmup_epochs": 1.0,
    "optim.max_epoch": 50,
    "train.batch_size": 32,
    "model.drop_path": 0.1,
}

# The original code's flag names (pt_main.py / ft_main.py) -> our dotted keys.
ALIASES: dict[str, str] = {
    "max_epoch": "optim.max_epoch",
    "warmup_epoch": "optim.warmup_epochs",
    "batch_size": "train.batch_size",
    "lr": "optim.lr",
    "cen_mean": "model.cen_mean",
    "cen_num": "model.cen_num",
    "aug_size_a": "model.aug_size_a",
    "aug_size_v": "model.aug_size_v",
    "ftmode": "model.ftmode",
    "trainfunc_ft": "train.trainfunc_ft",
    "pretrained_model": "model.pretrained_model",
    "audio_pretrained_encoder": "model.audio_pretrained_encoder",
    "visual_pretrained_encoder": "model.visual_pretrained_encoder",
    "save_path": "train.save_path",
    "bal": "train.bal",
    "mixup": "augment.mixup",
    "head_lr": "optim.head_lr",
    "dataset": "data.dataset",
}

# Values the original accepts that our fields spell differently (matched case-insensitively).
_ALIAS_VALUES: dict[str, dict[str, str]] = {
    "trainfunc_ft": {"bceloss": "BCE", "celoss": "CE", "bce": "BCE", "ce": "CE"},
    "bal": {"bal": "true", "none": "false"},  # CAV-MAE spells it --bal bal
}

# Flags of the original's command lines that mean nothing here: accepted, ignored, logged.
# Value: whether the flag takes a value, and why it is ignored.
_IGNORED_FLAGS: dict[str, tuple[bool, str]] = {
    "gpu": (True, "torchrun decides which devices each process uses"),
    "model": (True, "the subcommand (pretrain / finetune) decides the model"),
    "no_wandb": (False, "there is no wandb logging here"),
}

# Extra words for the type error of a key.
_HINTS: dict[str, str] = {
    "quirks.audio_only_head": (
        "the original's audio_only head cannot run (a 768-wide classifier on 512-wide "
        "features), so only 'linear' exists"
    ),
    "model.aug_size_a": "the audio parameter vector has 24 values",
    "model.aug_size_v": "the visual parameter vector has 18 values",
}


# ---------------------------------------------------------------------------------------------
# Defaults, datasets, resolution
# ---------------------------------------------------------------------------------------------


def default_config(mode: Literal["pretrain", "finetune"] = "pretrain") -> Config:
    """The paper's defaults: the pretraining recipe, or the finetuning recipe for "finetune"."""
    if mode == "pretrain":
        return Config()
    if mode == "finetune":
        return apply_overrides(Config(), _FINETUNE_DEFAULTS, source="finetune defaults")
    raise ConfigError(f"default_config: mode {mode!r} is not 'pretrain' or 'finetune'")


def dataset_defaults(name: str) -> dict[str, Any]:
    """The dataset's label count, metric and fbank mean/std (None where the config supplies it)."""
    if name not in _DATASETS:
        raise ConfigError(f"unknown dataset {name!r}: expected one of {', '.join(_DATASETS)}")
    return dict(_DATASETS[name])


def count_labels(label_csv: str | os.PathLike) -> int:
    """Number of classes in a `class_labels_indices.csv` (rows after the header)."""
    path = Path(label_csv)
    try:
        with open(path, newline="") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the label CSV: {e.strerror}") from e
    if len(rows) < 2:
        raise ConfigError(f"{path}: the label CSV has no rows below its header")
    return len(rows) - 1


def resolve(cfg: Config) -> Config:
    """A copy of `cfg` with the dataset-derived `None`s filled in (n_classes, mean, std, metric).

    Call it before saving a run's config so the file records the numbers the run used.
    """
    out = copy.deepcopy(cfg)
    out.data.n_classes = cfg.data.resolved_n_classes()
    out.data.audio_mean = cfg.data.resolved_mean()
    out.data.audio_std = cfg.data.resolved_std()
    out.data.metric = cfg.data.resolved_metric()
    return out


# ---------------------------------------------------------------------------------------------
# Type checking
# ---------------------------------------------------------------------------------------------

_TRUE = {"true", "t", "yes", "y", "on", "1"}
_FALSE = {"false", "f", "no", "n", "off", "0"}
_NONE = {"none", "null", "~"}


def field_choices(cls: type, name: str) -> tuple[Any, ...]:
    """The values a ``Literal`` field of a config dataclass allows, in declared order: the one
    list that flags, checks and benchmarks read (``field_choices(TrainConfig, "precision")``)."""
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) is not Literal:
        raise TypeError(f"{cls.__name__}.{name} is not a Literal field: {tp}")
    return typing.get_args(tp)


def _section_types(section: str) -> dict[str, Any]:
    """Field name -> resolved type hint of one section's dataclass."""
    cls = _section_class(section)
    return typing.get_type_hints(cls)


def _section_class(section: str) -> type:
    return typing.get_type_hints(Config)[section]


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple of {_type_name(args[0])}"
        return f"tuple of {len(args)} {_type_name(args[0])}"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if tp is bool:
        return "bool (true/false)"
    return getattr(tp, "__name__", str(tp))


def _split_sequence(value: Any) -> list[Any] | None:
    """A YAML list/tuple as is; a string like "0.1,2", "(0.1, 2)" or "[0.1, 2]" split on commas."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text[:1] + text[-1:] in ("()", "[]"):
            text = text[1:-1]
        return [part.strip() for part in text.split(",")] if text.strip() else []
    return None


def _coerce(value: Any, tp: Any) -> Any:
    """`value` (a YAML value or a command-line string) as type `tp`; ValueError if it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported union {tp}")
        return _coerce(value, inner[0])
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and value.strip() == str(choice)):
                return choice
        raise ValueError
    if origin in (tuple, list):
        items = _split_sequence(value)
        if items is None:
            raise ValueError
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            parsed = [_coerce(item, args[0]) for item in items]
        else:
            if len(items) != len(args):
                raise ValueError
            parsed = [_coerce(item, t) for item, t in zip(items, args, strict=True)]
        return parsed if origin is list else tuple(parsed)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError
    if tp is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string: parse it here.
            return float(value.strip())
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    raise TypeError(f"unsupported field type {tp}")


def _set_value(cfg: Config, key: str, value: Any, source: str) -> None:
    """Type-check `value` for dotted `key` and store it in `cfg` (in place)."""
    section, dot, name = key.partition(".")
    if section not in SECTIONS:
        hint = ""
        owners = [s for s in SECTIONS if key in _section_types(s)]
        if not dot and owners:
            hint = f" (did you mean {', '.join(f'{s}.{key}' for s in owners)}?)"
        raise ConfigError(
            f"{source}: unknown key {key!r}{hint}: keys are section.name with section one of "
            f"{', '.join(SECTIONS)}"
        )
    fields = _section_types(section)
    if name not in fields:
        raise ConfigError(
            f"{source}: unknown key {key!r}: valid keys in [{section}]: {', '.join(fields)}"
        )
    tp = fields[name]
    try:
        parsed = _coerce(value, tp)
    except ValueError:
        hint = f" ({_HINTS[key]})" if key in _HINTS else ""
        raise ConfigError(
            f"{source}: {key} = {value!r} is not a valid {_type_name(tp)}{hint}"
        ) from None
    setattr(getattr(cfg, section), name, parsed)


def _flatten(overrides: Mapping[str, Any], source: str) -> list[tuple[str, Any]]:
    """`{section: {key: v}}` and/or `{"section.key": v}` -> [("section.key", v), ...]."""
    flat: list[tuple[str, Any]] = []
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} is not a string")
        if key in SECTIONS:
            if value is None:  # an empty section in YAML
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{source}: section {key!r} must be a mapping of keys to values, "
                    f"got {type(value).__name__}"
                )
            for name, inner in value.items():
                flat.append((f"{key}.{name}", inner))
        else:
            flat.append((key, value))
    return flat


def apply_overrides(cfg: Config, overrides: Mapping[str, Any], source: str = "overrides") -> Config:
    """A copy of `cfg` with `overrides` applied, in order.

    `overrides` maps dotted keys (`"optim.lr"`) or section names (`{"optim": {"lr": ...}}`) to
    values, which may be Python values or strings to parse. `source` names the origin in errors.
    Cross-field rules are not checked here (call `validate` once everything is applied).
    """
    out = copy.deepcopy(cfg)
    for key, value in _flatten(overrides, source):
        _set_value(out, key, value, source)
    return out


# ---------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read one config YAML file into a dict (empty file: {}); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def apply_yaml(cfg: Config, path: str | os.PathLike) -> Config:
    """A copy of `cfg` with one YAML config file applied."""
    return apply_overrides(cfg, load_yaml(path), source=str(path))


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """`{section: {key: value}}` with YAML-safe values (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {
        section: {
            f.name: plain(getattr(getattr(cfg, section), f.name))
            for f in dataclasses.fields(getattr(cfg, section))
        }
        for section in SECTIONS
    }


class _Dumper(yaml.SafeDumper):
    """SafeDumper writing sections as blocks and lists inline (`[0.08, 1.0]`)."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, True)
)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write every key of `cfg` as YAML that `--config path` reads back to an equal Config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# Resolved run configuration (equiav.config.save_config).\n" + text)
    os.replace(tmp, path)  # never leave a half-written config beside a run


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def validate(cfg: Config) -> Config:
    """Check the rules that tie fields together; raise one ConfigError listing every problem."""
    d, a, m, o, t, e = cfg.data, cfg.augment, cfg.model, cfg.optim, cfg.train, cfg.eval
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for name in (
        "sample_rate",
        "target_length",
        "num_mel_bins",
        "frames_per_clip",
        "image_size",
        "num_threads",
        "prefetch",
    ):
        need(getattr(d, name) >= 1, f"data.{name} must be >= 1")
    need(d.py_workers >= 0, "data.py_workers must be >= 0")
    need(d.video_decoder in ("auto", "cpu", "gpu"), "data.video_decoder must be auto, cpu or gpu")
    need(d.thread_prefetch >= 0, "data.thread_prefetch must be >= 0")
    need(0.0 <= d.hw_decoder_load <= 1.0, "data.hw_decoder_load must be in [0, 1]")
    need(d.clip_seconds > 0, "data.clip_seconds must be > 0")
    need(0 <= d.eval_frame < d.frames_per_clip, "data.eval_frame must be in [0, frames_per_clip)")
    need(0.0 <= d.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
    need(d.n_classes is None or d.n_classes >= 1, "data.n_classes must be >= 1")
    need(d.audio_std is None or d.audio_std > 0, "data.audio_std must be > 0")
    if d.dataset == "synthetic":
        need(
            d.audio_mean is not None and d.audio_std is not None,
            "data.audio_mean and data.audio_std must be set for the synthetic dataset",
        )
    for name in ("num_mel_bins", "target_length", "image_size"):
        need(
            getattr(d, name) % m.patch_size == 0,
            f"data.{name} ({getattr(d, name)}) must be a multiple of model.patch_size "
            f"({m.patch_size})",
        )

    for name in ("specaug_p", "jitter_p", "blur_p", "flip_p", "gray_p", "mixup"):
        need(0.0 <= getattr(a, name) <= 1.0, f"augment.{name} must be in [0, 1]")
    need(0 <= a.time_mask <= d.target_length, "augment.time_mask must be in [0, target_length]")
    need(0 <= a.ft_timem <= d.target_length, "augment.ft_timem must be in [0, target_length]")
    need(0 <= a.freq_mask <= d.num_mel_bins, "augment.freq_mask must be in [0, num_mel_bins]")
    need(0 <= a.ft_freqm <= d.num_mel_bins, "augment.ft_freqm must be in [0, num_mel_bins]")
    for name in (
        "audio_rrc_scale",
        "audio_rrc_ratio",
        "visual_rrc_scale",
        "visual_rrc_ratio",
        "blur_sigma",
    ):
        lo, hi = getattr(a, name)
        need(0 < lo <= hi, f"augment.{name} must be (low, high) with 0 < low <= high")
    need(a.audio_rrc_scale[1] <= 1 and a.visual_rrc_scale[1] <= 1, "augment.*_rrc_scale <= 1")
    for name in ("brightness", "contrast", "saturation"):
        need(0 <= getattr(a, name) < 1, f"augment.{name} must be in [0, 1)")
    need(0 <= a.hue <= 0.5, "augment.hue must be in [0, 0.5]")
    need(a.mixup_alpha > 0, "augment.mixup_alpha must be > 0")

    for name in (
        "embed_dim",
        "depth",
        "num_heads",
        "patch_size",
        "aug_hidden",
        "head_hidden",
        "head_out",
        "predictor_heads",
        "predictor_head_dim",
        "cen_num",
        "ft_proj_dim",
    ):
        need(getattr(m, name) >= 1, f"model.{name} must be >= 1")
    need(
        m.num_heads >= 1 and m.embed_dim % m.num_heads == 0,
        "model.embed_dim must be a multiple of model.num_heads",
    )
    need(m.mlp_ratio > 0, "model.mlp_ratio must be > 0")
    need(
        m.aug_size_a == 24,
        f"model.aug_size_a must be 24 ({_HINTS['model.aug_size_a']}; the "
        "original's smaller ablation sizes are not implemented)",
    )
    need(
        m.aug_size_v == 18,
        f"model.aug_size_v must be 18 ({_HINTS['model.aug_size_v']}; the "
        "original's other ablation sizes are not implemented)",
    )
    need(m.temperature > 0, "model.temperature must be > 0")
    need(0 <= m.drop_path < 1, "model.drop_path must be in [0, 1)")

    need(o.lr > 0, "optim.lr must be > 0")
    need(o.weight_decay >= 0, "optim.weight_decay must be >= 0")
    need(all(0 <= b < 1 for b in o.betas), "optim.betas must be in [0, 1)")
    need(o.eps > 0, "optim.eps must be > 0")
    need(o.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
    need(o.warmup_start_lr >= 0 and o.min_lr >= 0, "optim.warmup_start_lr, min_lr must be >= 0")
    need(o.max_epoch >= 1, "optim.max_epoch must be >= 1")
    need(o.head_lr > 0, "optim.head_lr must be > 0")
    need(o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 turns clipping off)")

    for name in ("batch_size", "keep_last", "log_every", "max_nonfinite_in_row"):
        need(getattr(t, name) >= 1, f"train.{name} must be >= 1")
    need(t.ckpt_every_steps >= 0, "train.ckpt_every_steps must be >= 0")
    need(t.compile_mode in COMPILE_MODES, f"train.compile_mode must be one of {COMPILE_MODES}")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps must be >= 1")
    need(t.save_path.strip() != "", "train.save_path must not be empty")

    need(e.every_epochs >= 1, "eval.every_epochs must be >= 1")
    need(e.batch_size is None or e.batch_size >= 1, "eval.batch_size must be >= 1")
    need(
        0 <= e.retrieval_frame < d.frames_per_clip,
        "eval.retrieval_frame must be in [0, data.frames_per_clip)",
    )
    need(
        len(e.retrieval_ks) > 0 and all(k >= 1 for k in e.retrieval_ks),
        "eval.retrieval_ks must be a non-empty list of ints >= 1",
    )

    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return cfg


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(
    argv: Sequence[str] | None = None, defaults: Config | None = None
) -> tuple[Config, list[str]]:
    """Build a Config from `--config`, `--set` and paper-flag arguments; return it and the rest.

    Recognised: `--config FILE` (repeatable), `--set section.key=value` (repeatable), the paper's
    flags in `ALIASES` (`--lr 1e-4` or `--lr=1e-4`), and the original's `--gpu`, `--model`,
    `--no_wandb` (ignored with a warning). Configs are applied first, in order, then the `--set`
    and alias overrides in order; the result is validated. Everything else (positionals, other
    flags, anything after `--`) is returned in order for the caller to parse or reject.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = copy.deepcopy(defaults) if defaults is not None else Config()
    config_files: list[str] = []
    overrides: list[tuple[str, str, str]] = []  # (key, value, source)
    rest: list[str] = []

    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            rest.extend(argv[i:])
            break
        if not token.startswith("--"):
            rest.append(token)
            continue
        name, has_inline, inline = token[2:].partition("=")
        known = name in ("config", "set") or name in ALIASES or name in _IGNORED_FLAGS
        if not known:
            rest.append(token)
            continue
        takes_value = _IGNORED_FLAGS[name][0] if name in _IGNORED_FLAGS else True
        value: str | None = None
        if takes_value:
            if has_inline:
                value = inline
            elif i < len(argv):
                value = argv[i]
                i += 1
            else:
                raise ConfigError(f"--{name} needs a value")
        elif has_inline:
            raise ConfigError(f"--{name} takes no value")

        if name == "config":
            config_files.append(value)
        elif name == "set":
            key, eq, text = value.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"--set {value!r}: expected section.key=value")
            overrides.append((key.strip(), text, f"--set {value}"))
        elif name in ALIASES:
            text = _ALIAS_VALUES.get(name, {}).get(value.strip().lower(), value)
            overrides.append((ALIASES[name], text, f"--{name} {value} (alias of {ALIASES[name]})"))
        else:
            logger.warning(
                "ignoring --%s%s: %s", name, f" {value}" if value else "", _IGNORED_FLAGS[name][1]
            )

    for path in config_files:
        cfg = apply_yaml(cfg, path)
    for key, text, source in overrides:
        _set_value(cfg, key, text, source)
    return validate(cfg), rest


def load_config(argv: Sequence[str] | None = None, defaults: Config | None = None) -> Config:
    """Like `parse_args`, but every argument must be a config argument."""
    cfg, rest = parse_args(argv, defaults)
    if rest:
        raise ConfigError(f"unrecognised arguments: {' '.join(rest)}")
    return cfg


def format_help() -> str:
    """Text for a `--help`: the config arguments, the paper's flag aliases and every key."""
    lines = [
        "Configuration (applied in this order):",
        "  --config FILE             YAML preset/overlay; repeatable, applied in order",
        "  --set section.key=value   override one key; repeatable, applied after all --config",
        "Paper flag aliases:",
    ]
    lines += [f"  --{flag:<26}= --set {key}=..." for flag, key in ALIASES.items()]
    lines += [f"  --{flag:<26}ignored: {why}" for flag, (_, why) in _IGNORED_FLAGS.items()]
    lines.append("Keys (defaults):")
    for section, values in config_to_dict(Config()).items():
        for key, value in values.items():
            lines.append(f"  {section}.{key} = {value!r}")
    return "\n".join(lines)
