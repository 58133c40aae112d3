"""Train EquiAV: ``python train.py pretrain|finetune --config FILE [--set key=value ...]``.

Run under ``torchrun`` for several GPUs or nodes (``torchrun --nproc_per_node 8 train.py ...``);
``batch_size`` is per process. ``--dry-run`` builds the model at its configured size without data
and prints the trainable parameter count, in total and per module.

The wiring, top to bottom: distributed set-up -> config (resolved, saved with the run) -> model
(+ pretrained weights) -> task (loss, evaluation) -> ``equiav.train.loop.train``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
import torch.nn.functional as F

from equiav.config import Config, default_config, parse_args, resolve
from equiav.losses import equiav_loss
from equiav.model import EquiAVFinetune, EquiAVPretrain, count_parameters, load_mae_encoders
from equiav.train.dist import DistInfo, destroy, init_distributed
from equiav.train.loop import StopTraining, Task, train

log = logging.getLogger("train")


def _dense(x: torch.Tensor) -> torch.Tensor:
    """The view as a contiguous tensor. The loader's clean audio view is three channels expanded
    from one (no copy), other feeders' are not; torch.compile specialises on strides, so without
    this every feeder (and the benchmarks' fixed batch) costs a compilation of its own."""
    return x.contiguous()


def pretrain_task(cfg: Config, load_weights: bool = True, dist: DistInfo | None = None) -> Task:
    """EquiAV pretraining: the model of the spec and (inter + intra_a + intra_v) / 3."""
    model = EquiAVPretrain(cfg.model, cfg.data)
    wanted = cfg.model.audio_pretrained_encoder or cfg.model.visual_pretrained_encoder
    if load_weights and wanted:
        reports = load_mae_encoders(
            model, cfg.model.audio_pretrained_encoder, cfg.model.visual_pretrained_encoder
        )
        for report in reports.values():
            log.info("%s", report.summary())

    def loss(net, batch):
        out = net(
            *(_dense(batch[k]) for k in ("audio", "visual", "audio_aug", "visual_aug")),
            batch["t_a"],
            batch["t_v"],
            batch.get("t_a_cen"),
            batch.get("t_v_cen"),
        )
        losses = equiav_loss(out, cfg.model.temperature, cfg.quirks.inter_gather_with_grad)
        total = losses.pop("total")
        return total, {k: v.detach() for k, v in losses.items()}

    return Task("pretrain", model, loss)


def finetune_loss(trainfunc: str):
    """BCE on multi-hot targets (AudioSet) or cross-entropy on the (mixed) label distribution."""

    def loss(net, batch):
        logits = net(_dense(batch["audio"]), _dense(batch["visual"])).float()
        if trainfunc == "BCE":
            value = F.binary_cross_entropy_with_logits(logits, batch["labels"])
        else:
            value = F.cross_entropy(logits, batch["labels"])
        return value, {}

    return loss


def validation(cfg: Config, dist: DistInfo):
    """The per-epoch evaluation of finetuning on the validation list (``data.val_json``, or the
    held-out ``data.val_fraction`` of the training list); None when there is neither."""
    if cfg.data.val_fraction <= 0 and cfg.data.val_json is None:
        return None
    from dali_pipelines.loader import build_loader
    from dali_pipelines.sources import Shard
    from evaluate import evaluate_model

    cache = {}

    def run(model):
        if "loader" not in cache:  # built once, on first use (after the training loader)
            # A held-out part of the training list, which the training loader has checked:
            # its check's cache is taken as it is.
            cache["loader"] = build_loader(
                cfg,
                "val",
                "eval",
                Shard(dist.rank, dist.world_size),
                dist.device,
                recheck=cfg.data.val_fraction <= 0,
            )
        loader = cache["loader"]
        return evaluate_model(
            model,
            loader,
            loader.labels.names,
            dist,
            metric=cfg.data.resolved_metric(),
            precision=cfg.train.precision,
        )

    return run


def finetune_task(cfg: Config, load_weights: bool = True, dist: DistInfo | None = None) -> Task:
    """Finetuning with the ftmode's head on the pretrained towers (lr x head_lr for new layers)."""
    model = EquiAVFinetune(cfg.model, cfg.data, cfg.data.resolved_n_classes())
    if load_weights and cfg.model.pretrained_model:
        log.info("%s", model.load_pretrained(cfg.model.pretrained_model).summary())
    elif load_weights:
        log.warning("model.pretrained_model is not set: finetuning from scratch")
    return Task(
        "finetune",
        model,
        finetune_loss(cfg.train.trainfunc_ft),
        new_parameters=model.new_parameters(),
        balanced=cfg.train.bal,
        evaluate=validation(cfg, dist) if dist is not None else None,
    )


TASKS = {"pretrain": pretrain_task, "finetune": finetune_task}


def dry_run(cfg: Config, mode: str) -> None:
    """Build the model at its configured size, without data or pretrained weights, and print its
    parameter counts."""
    model = TASKS[mode](cfg, load_weights=False).model
    counts = count_parameters(model)
    print(f"trainable parameters: {sum(counts.values())}")
    for name, n in counts.items():
        print(f"  {name}: {n}")


def parse_command(argv: list[str]) -> tuple[str, Config, argparse.Namespace]:
    """`train.py`'s command line -> (task, config with the YAML preset and every --set applied,
    the other options). A bad command exits with status 2 and says why."""
    if not argv or argv[0] not in TASKS:
        print(
            f"usage: train.py {{{','.join(TASKS)}}} --config FILE [--set key=value ...] "
            "[--dry-run]",
            file=sys.stderr,
        )
        raise SystemExit(2)
    mode, argv = argv[0], argv[1:]
    cfg, rest = parse_args(argv, default_config(mode))
    extra = argparse.ArgumentParser(prog=f"train.py {mode}")
    extra.add_argument("--dry-run", action="store_true", help="build the model and count it")
    return mode, cfg, extra.parse_args(rest)


def main(argv: list[str] | None = None) -> int:
    try:
        mode, cfg, args = parse_command(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.dry_run:
        dry_run(cfg, mode)
        return 0
    dist: DistInfo = init_distributed(cfg.train.dist_backend)
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        cfg = resolve(cfg)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        summary = train(cfg, TASKS[mode](cfg, dist=dist), dist)
    except StopTraining as e:
        log.error("%s", e)
        return 3
    finally:
        destroy()
    if dist.is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
