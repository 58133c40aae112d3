"""``python -m dali_pipelines.preview DATA.json --mode pretrain|finetune|eval --out DIR``.

Writes a few samples as PNG images, exactly as the model receives them from the pipeline: the
clean and (pretraining) augmented filterbanks and frames side by side, with the t-vectors decoded
into readable text ("crop top=0.12 ...; jitter on, order 2,0,3,1 ..."), so that a person can see
what the model sees. Accepts the config options of ``train.py`` (``--config``, ``--set``) for the
clip geometry; the label CSV defaults to ``class_labels_indices.csv`` beside DATA.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

JITTER = ("brightness", "contrast", "saturation", "hue")


def describe_audio(t: np.ndarray) -> str:
    """t_a (24) as text (the crop with the original's swapped scaling, as recorded)."""
    parts = []
    if t[0]:
        parts.append(
            f"specaug time [{t[1]:.0f},{t[2]:.0f}) freq [{t[3]:.0f},{t[4]:.0f}) shift {t[6]:+.3f}"
        )
    else:
        parts.append("specaug off")
    parts.append(f"crop i/F={t[8]:.3f} j/T={t[9]:.3f} h/F={t[10]:.3f} w/T={t[11]:.3f}")
    parts.append(_jitter_text(t[12:21]))
    parts.append(f"blur sigma={t[22]:.2f}" if t[21] else "blur off")
    parts.append("flip (frequency)" if t[23] else "no flip")
    return "; ".join(parts)


def describe_visual(t: np.ndarray) -> str:
    """t_v (18) as text."""
    parts = [
        f"crop top={t[1]:.2f} left={t[2]:.2f} h={t[3]:.2f} w={t[4]:.2f}",
        _jitter_text(t[5:14]),
        f"blur sigma={t[15]:.2f}" if t[14] else "blur off",
        "flip" if t[16] else "no flip",
        "grayscale" if t[17] else "colour",
    ]
    return "; ".join(parts)


def _jitter_text(j: np.ndarray) -> str:
    if not j[0]:
        return "jitter off"
    order = ",".join(str(int(x)) for x in j[1:5])
    factors = " ".join(f"{name[0]}={v:+.2f}" for name, v in zip(JITTER, j[5:9], strict=True))
    return f"jitter on, order {order} ({factors})"


def _image(x: torch.Tensor, mean, std) -> np.ndarray:
    """(3, H, W) normalised -> HWC in [0, 1] for display."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x.cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def write_previews(batch: dict, out: Path, mode: str, mean, std, names: list[str]) -> list[Path]:
    """One PNG per sample of ``batch``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    aug = mode == "pretrain"
    for b in range(len(batch["index"])):
        cols = 2 if aug else 1
        fig, axes = plt.subplots(2, cols, figsize=(6 * cols, 7), squeeze=False)
        axes[0, 0].imshow(batch["audio"][b, 0].cpu().numpy(), origin="lower", aspect="auto")
        axes[0, 0].set_title("clean fbank (frequency x time)")
        axes[1, 0].imshow(_image(batch["visual"][b], mean, std))
        axes[1, 0].set_title(f"clean frame k={int(batch['frame_k'][b, 0])}")
        text = names[b]
        if aug:
            axes[0, 1].imshow(batch["audio_aug"][b, 0].cpu().numpy(), origin="lower", aspect="auto")
            axes[0, 1].set_title("augmented fbank")
            axes[1, 1].imshow(_image(batch["visual_aug"][b], mean, std))
            axes[1, 1].set_title(f"augmented frame k={int(batch['frame_k'][b, 1])}")
            text += (
                "\naudio: "
                + describe_audio(batch["t_a"][b].cpu().numpy())
                + "\nvisual: "
                + describe_visual(batch["t_v"][b].cpu().numpy())
            )
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(text, fontsize=7, wrap=True)
        fig.tight_layout(rect=(0, 0, 1, 0.86 if aug else 0.94))
        path = out / f"{mode}_{b:02d}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    from dali_pipelines.loader import build_loader
    from equiav.config import apply_overrides, default_config, load_config, resolve

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", help="dataset JSON")
    parser.add_argument("--mode", choices=("pretrain", "finetune", "eval"), default="pretrain")
    parser.add_argument("--out", required=True)
    parser.add_argument("--label-csv", default=None)
    parser.add_argument("--samples", type=int, default=4)
    args, config_args = parser.parse_known_args(argv)
    data = Path(args.data)
    beside = data.parent / "class_labels_indices.csv"
    label_csv = args.label_csv or (str(beside) if beside.exists() else None)
    split = "test" if args.mode == "eval" else "train"
    overrides = [
        f"data.{split}_json={data}",
        f"train.batch_size={args.samples}",
        f"eval.batch_size={args.samples}",
    ]
    if label_csv is not None:
        overrides.append(f"data.label_csv={label_csv}")
    for item in overrides:
        config_args += ["--set", item]
    try:
        cfg = load_config(config_args, default_config())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.data.dataset == "synthetic" and cfg.data.audio_mean is None:
        cfg = apply_overrides(cfg, {"data.audio_mean": -4.346, "data.audio_std": 4.332})
    try:
        cfg = resolve(cfg)
        loader = build_loader(cfg, split, args.mode)
        batch = next(iter(loader))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    names = [loader.entries[int(i)].video_id for i in batch["index"]]
    paths = write_previews(
        batch, Path(args.out), args.mode, cfg.data.image_mean, cfg.data.image_std, names
    )
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
