"""Fbank normalisation statistics of a dataset, computed through the training input pipeline.

Command line::

    python -m equiav.data.stats DATA.json --label-csv CSV [--samples 5000] [--seed 0] \\
        [--write-preset FILE] [--seconds 10] [--frames-per-clip 10] [--target-length 1024]

What is measured: the mean and standard deviation of the un-normalised Kaldi log-mel filterbank
as the model receives it, i.e. the ``(target_length, 128)`` fbank zero-padded (or cut) to 1024
frames, padding included. That is what CAV-MAE's (and AST's) ``get_norm_stats.py`` does to get
the numbers the spec quotes (AudioSet -4.346 / 4.332, VGGSound -4.956 / 4.486): it runs the
training dataloader with normalisation skipped and takes ``torch.mean`` / ``torch.std`` of whole
batches of padded fbanks. Here the values come from our own loader (``DaliLoader`` in ``eval``
mode with ``audio_mean=0``, ``audio_std=1``: no augmentation, every sampled clip once, padding
rows dropped), so they are of exactly the tensors training normalises. Two differences from the
original script, both documented choices: we pool all values of the sample (one mean and one
standard deviation, population form, accumulated in float64), where it averages per-batch means
and per-batch standard deviations (equal for the mean; its std is slightly smaller when batch
means differ); and we use a seeded random sample of ``--samples`` clips rather than the whole
training list (for millions of clips the sample's error, about 0.02 for 5000 clips, is far below
what matters to a normalisation).

The sampled entries go through the dataset checker first (only they are checked, from a temporary
list), as ``build_loader`` does before training: entries with errors are skipped and logged.

``--write-preset FILE`` writes ``data: {audio_mean, audio_std}`` (4 decimals): merged into FILE when
it exists (its other keys and its comments kept: the two lines are edited in place, or added
under ``data:``; when the file's layout does not allow a safe edit, the merged mapping is written
without comments), else as a new overlay file to pass after the dataset's preset
(``--config preset.yaml --config FILE``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from equiav.data.index import Entry, LabelSet, read_dataset, read_label_csv, write_dataset

log = logging.getLogger(__name__)
DEFAULT_SAMPLES = 5000
DECIMALS = 4  # digits written to the preset


@dataclass(frozen=True)
class FbankStats:
    """Pooled statistics of the padded fbank values of ``clips`` clips (``values`` numbers)."""

    mean: float
    std: float
    clips: int
    values: int


def sample_entries(entries: Sequence[Entry], samples: int, seed: int) -> list[Entry]:
    """``samples`` entries drawn without replacement (seeded), in file order; all if fewer."""
    if samples <= 0:
        raise ValueError(f"samples must be positive, got {samples}")
    if samples >= len(entries):
        return list(entries)
    picked = np.sort(np.random.default_rng(seed).choice(len(entries), samples, replace=False))
    return [entries[i] for i in picked]


def fbank_stats(
    entries: Sequence[Entry],
    labels: LabelSet,
    *,
    batch_size: int = 16,
    target_frames: int = 1024,
    frames_per_clip: int = 10,
    eval_frame: int | None = None,
    num_threads: int = 2,
    device: str = "cpu",
    progress: bool = False,
) -> FbankStats:
    """Mean and std of the un-normalised, padded fbank of ``entries`` through ``DaliLoader``.

    ``eval_frame`` (default ``frames_per_clip // 2``, the spec's 5 for 10 frames) only picks
    the frame the loader decodes alongside; it does not touch the audio.
    """
    import torch
    from tqdm import tqdm

    from dali_pipelines.loader import DaliLoader, LoaderConfig

    if not entries:
        raise ValueError("no entries to compute statistics of")
    cfg = LoaderConfig(
        batch_size=min(batch_size, len(entries)),
        mode="eval",
        audio_mean=0.0,  # normalisation off: (x - 0) / 1
        audio_std=1.0,
        target_frames=target_frames,
        frames_per_clip=frames_per_clip,
        eval_frame=frames_per_clip // 2 if eval_frame is None else eval_frame,
        num_threads=num_threads,
    )
    loader = DaliLoader(entries, labels, cfg, device=device)
    total = torch.zeros((), dtype=torch.float64, device=loader.device)
    total_sq = torch.zeros((), dtype=torch.float64, device=loader.device)
    rows = 0
    with tqdm(total=len(entries), desc="fbank stats", unit="clip", disable=not progress) as bar:
        for batch in loader:
            # (B, 3, 128, T): three equal channels; one is the fbank.
            x = batch["audio"][:, 0].double()
            total += x.sum()
            total_sq += x.square().sum()
            rows += x.shape[0]
            bar.update(x.shape[0])
    if rows == 0:
        raise ValueError("the loader yielded no samples (all skipped?)")
    if loader.skipped:
        log.warning("%d sampled clips were skipped by the loader", len(loader.skipped))
    n = rows * 128 * target_frames
    mean = float(total) / n
    var = max(float(total_sq) / n - mean * mean, 0.0)
    return FbankStats(mean=mean, std=var**0.5, clips=rows, values=n)


def dataset_stats(
    json_path: str | os.PathLike,
    label_csv: str | os.PathLike,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    seconds: float = 10.0,
    sample_rate: int = 16000,
    frames_per_clip: int = 10,
    eval_frame: int | None = None,
    target_frames: int = 1024,
    batch_size: int = 16,
    num_threads: int = 2,
    device: str = "cpu",
    progress: bool = True,
) -> FbankStats:
    """Statistics of a seeded sample of a dataset file (checked first, as training does)."""
    import torch

    from dali_pipelines.loader import checked_entries

    picked = sample_entries(read_dataset(json_path), samples, seed)
    with tempfile.TemporaryDirectory(prefix="equiav-stats-") as tmp:
        # The checker reads a list file: give it only the sample, so that a big dataset is not
        # checked in full for a few thousand clips. Absolute paths: the list lives elsewhere.
        sample_json = Path(tmp) / f"{Path(json_path).stem}-sample.json"
        write_dataset(sample_json, picked, relative=False)
        clean, _, _ = checked_entries(
            str(sample_json),
            str(label_csv),
            seconds=seconds,
            sample_rate=sample_rate,
            frames_per_clip=frames_per_clip,
            gpu=torch.device(device).type == "cuda",
            video_decoder="gpu",  # fbank_stats' loader keeps its default (NVDEC on a GPU)
            progress=progress,
        )
    return fbank_stats(
        clean,
        read_label_csv(label_csv),
        batch_size=batch_size,
        target_frames=target_frames,
        frames_per_clip=frames_per_clip,
        eval_frame=eval_frame,
        num_threads=num_threads,
        device=device,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

_TOP_KEY = re.compile(r"^[^\s#][^:]*:")


def _format(value: float) -> str:
    return f"{value:.{DECIMALS}f}"


def _merge_text(text: str, values: dict[str, str]) -> str:
    """``text`` with ``data.<key>: value`` set for each key: lines edited in place (their
    trailing comments kept), missing keys added under ``data:``, a missing ``data:`` appended."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^data:\s*(#.*)?$", line)), None)
    if start is None:
        body = "".join(f"  {k}: {v}\n" for k, v in values.items())
        return text + ("" if not text or text.endswith("\n") else "\n") + "data:\n" + body
    end = next((i for i in range(start + 1, len(lines)) if _TOP_KEY.match(lines[i])), len(lines))
    children = [
        line
        for line in lines[start + 1 : end]
        if line.strip() and not line.lstrip().startswith("#")
    ]
    indent = re.match(r"^(\s*)", children[0]).group(1) if children else "  "
    todo = dict(values)
    for i in range(start + 1, end):
        m = re.match(rf"^{indent}(\w+)(\s*:\s*)([^#]*?)(\s+#.*)?$", lines[i])
        if m and m.group(1) in todo:
            lines[i] = f"{indent}{m.group(1)}{m.group(2)}{todo.pop(m.group(1))}{m.group(4) or ''}"
    lines[start + 1 : start + 1] = [f"{indent}{k}: {v}" for k, v in todo.items()]
    return "\n".join(lines) + "\n"


def write_preset(
    path: str | os.PathLike, stats: FbankStats, source: str | None = None, seed: int | None = None
) -> None:
    """Set ``data.audio_mean`` / ``data.audio_std`` in the YAML preset ``path`` (see module doc).

    The file is replaced atomically; the result is read back with ``equiav.config.load_yaml``
    and must equal the old mapping with the two keys set.
    """
    import yaml

    from equiav.config import ConfigError, load_yaml

    path = Path(path)
    values = {"audio_mean": _format(stats.mean), "audio_std": _format(stats.std)}
    if path.exists():
        old = load_yaml(path)
        text = path.read_text()
    else:
        old = {}
        where = f" of {source}" if source else ""
        drawn = f", seed {seed}" if seed is not None else ""
        text = (
            f"# Fbank normalisation statistics{where} ({stats.clips} clips{drawn}), written by\n"
            "# python -m equiav.data.stats. Pass it after the dataset's preset: --config FILE.\n"
        )
    expected = copy.deepcopy(old)
    data = expected.setdefault("data", {})
    if data is None:
        data = expected["data"] = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: 'data' is not a mapping")
    data.update({k: float(v) for k, v in values.items()})

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(_merge_text(text, values))
        try:
            merged = load_yaml(tmp)
        except ConfigError:
            merged = None
        if merged != expected:
            log.warning("%s: could not edit the file in place; rewriting it without comments", path)
            tmp.write_text(yaml.safe_dump(expected, sort_keys=False))
            if load_yaml(tmp) != expected:
                raise ConfigError(f"{path}: cannot write the merged preset")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; prints the statistics (and writes the preset)."""
    p = argparse.ArgumentParser(
        prog="python -m equiav.data.stats",
        description="Mean/std of the un-normalised padded fbank, through the training loader.",
    )
    p.add_argument("json", help="dataset JSON")
    p.add_argument("--label-csv", required=True)
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="clips to sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-preset", metavar="FILE", help="YAML preset to set data.audio_* in")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length for the check")
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--frames-per-clip", type=int, default=10)
    p.add_argument("--eval-frame", type=int, default=None)
    p.add_argument("--target-length", type=int, default=1024, help="fbank frames (padded)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        stats = dataset_stats(
            args.json,
            args.label_csv,
            samples=args.samples,
            seed=args.seed,
            seconds=args.seconds,
            sample_rate=args.sample_rate,
            frames_per_clip=args.frames_per_clip,
            eval_frame=args.eval_frame,
            target_frames=args.target_length,
            batch_size=args.batch_size,
            num_threads=args.num_threads,
            device=device,
            progress=not args.no_progress,
        )
    except ValueError as e:  # DatasetError, ConfigError and bad arguments are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"audio_mean {_format(stats.mean)} audio_std {_format(stats.std)} "
        f"({stats.clips} clips, {stats.values} values of the {args.target_length}-frame padded "
        "fbank)"
    )
    if args.write_preset:
        try:
            write_preset(args.write_preset, stats, source=args.json, seed=args.seed)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.write_preset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
