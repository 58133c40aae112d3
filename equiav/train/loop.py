"""The training loop shared by pretraining and finetuning, in one readable function.

DALI batch -> autocast forward -> loss -> backward -> gradient-norm clip -> (fused) AdamW step,
with the warmup-cosine learning rate set per step (precision "bf16-master": on float32 master
copies of the bfloat16 model's weights, ``optim.MasterWeights``). Around it: DDP through
``torchrun`` (``equiav.train.dist``), checkpoints (``checkpoint``) holding everything a
bit-exact resume needs (model, optimizer, scaler, schedule, every rank's RNG and loader position,
the config; the weights always in float32), TensorBoard/jsonl curves and a progress bar
(``metrics_log``), a guard against non-finite losses (``step``: the update is skipped without
the host waiting for the GPU) and a clean stop on Ctrl-C / SIGTERM (a checkpoint is written
first). Between log steps nothing here reads a device value, so the next batch's loading
overlaps the GPU's work.

What differs between pretraining and finetuning is a ``Task``: the model, the loader mode, the
loss of a batch and an optional evaluation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dali_pipelines.loader import build_loader
from dali_pipelines.sources import Shard
from equiav.config import COMPILE_OPTIONS, Config, config_to_dict, save_config
from equiav.train import checkpoint as ckpt
from equiav.train.dist import DistInfo
from equiav.train.metrics_log import MetricsLogger, ProgressBar, StepTimer, environment_info
from equiav.train.optim import LRSchedule, autocast, build_optimizer, make_scaler, master_weights
from equiav.train.step import SkippedSteps, StopTraining, optimizer_step, step_stream
from kernels.float8 import Float8Linear

__all__ = ["StopTraining", "Task", "train"]

log = logging.getLogger(__name__)


@dataclass
class Task:
    """What a training run trains: the model, its loss on a batch, and how it is evaluated."""

    name: str  # "pretrain" or "finetune": also the loader mode
    model: nn.Module
    loss: Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, float | torch.Tensor]]]
    new_parameters: list[nn.Parameter] = field(default_factory=list)
    # Called at the end of every `eval.every_epochs`-th epoch on every rank: -> metrics, with the
    # selection metric under "metric" (higher is better).
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    balanced: bool = False  # class-balanced sampling (finetuning's `train.bal`)


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (tests): no handler
                pass

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _agree(flag: bool, device: torch.device, op=None) -> bool:
    """The same answer on every rank (MAX by default: any rank's True wins)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0.5)


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def compile_model(module: nn.Module, mode: str) -> nn.Module:
    """``torch.compile(module)`` in `mode` (``train.compile_mode``): one of torch's modes, or
    one of ours (``equiav.config.COMPILE_OPTIONS``), which torch.compile takes as options (it
    accepts a mode or options, not both). Float8 linears on a CPU are refused: torch 2.9's CPU
    compiler crashed the process (a segfault) on their weight gradients."""
    on_cpu = any(p.device.type == "cpu" for p in module.parameters())
    if on_cpu and any(isinstance(m, Float8Linear) for m in module.modules()):
        raise ValueError(
            "model.linear=float8 is not compiled on a CPU (torch's CPU compiler crashes on its "
            "gradients): set train.compile=false, or run on a GPU"
        )
    if mode in COMPILE_OPTIONS:
        return torch.compile(module, options=dict(COMPILE_OPTIONS[mode]))
    return torch.compile(module, mode=mode)


def train(cfg: Config, task: Task, dist: DistInfo) -> dict:
    """Run ``task`` as ``cfg`` says on this process; returns a summary of the run."""
    device = dist.device
    out_dir = Path(cfg.train.save_path)
    manager = ckpt.CheckpointManager(out_dir / "checkpoints", cfg.train.keep_last, "max")
    resume = ckpt.resolve_resume(cfg.train.resume, out_dir / "checkpoints")
    state = ckpt.load(resume, map_location="cpu") if resume is not None else None
    if state is not None and state.get("task") != task.name:
        raise ckpt.CheckpointError(f"{resume}: a {state.get('task')} checkpoint, not {task.name}")
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    loader_state = None
    if state is not None:
        states = state["loader"]
        loader_state = states[dist.rank] if len(states) == dist.world_size else states[0]
    loader = build_loader(
        cfg,
        "train",
        task.name,
        Shard(dist.rank, dist.world_size),
        device,
        loader_state,
        balanced=task.balanced,
    )
    steps_per_epoch = loader.steps_per_epoch
    schedule = LRSchedule.from_config(cfg.optim, steps_per_epoch)
    total_steps = cfg.optim.max_epoch * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    model = task.model.to(device)
    if state is not None:  # before master_weights, which copies the weights it finds
        model.load_state_dict(state["model"])
    # "bf16-master": the model becomes bfloat16, the optimiser steps float32 copies.
    master = master_weights(model, cfg.train.precision)
    optimizer = build_optimizer(model, cfg.optim, device, task.new_parameters, master)
    scaler = make_scaler(cfg.train.precision, device)
    step, best = 0, None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        schedule.load_state_dict(state["schedule"])
        step = int(state["step"])
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[dist.rank] if len(rngs) == dist.world_size else rngs[0])
        log.info("resumed from %s at step %d (epoch %d)", resume, step, loader.epoch)
    if device.type == "cuda":
        # TF32 for the model's matmuls only: the filterbank kernel asks for IEEE float32 itself.
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    net: nn.Module = model
    if dist.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        net = compile_model(net, cfg.train.compile_mode)

    logger = MetricsLogger(
        out_dir / "tb", enabled=dist.is_main, purge_step=step + 1 if step else None
    )
    if step == 0:
        logger.text("config", f"```\n{config_to_dict(cfg)}\n```")
        logger.text("environment", str(environment_info()))
    timer = StepTimer(device=device)
    bar = ProgressBar(total_steps, desc=task.name, enabled=dist.is_main)
    bar.update(step)
    stop = _StopFlag()
    skipped = SkippedSteps(cfg.train.max_nonfinite_in_row)
    params = [p for p in model.parameters() if p.requires_grad]
    history: list[dict] = []

    def model_state() -> dict[str, torch.Tensor]:
        state = _unwrap(net).state_dict()
        return master.fp32_state(state) if master is not None else state  # always float32

    def save(tag: str | None = None, metric: float | None = None) -> Path:
        payload = {
            "task": task.name,
            "model": model_state(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "schedule": schedule.state_dict(),
            "step": step,
            "rng": ckpt.gather_rank_states(ckpt.rng_state()),
            "loader": ckpt.gather_rank_states(loader.state_dict()),
            "config": config_to_dict(cfg),
        }
        return manager.save(payload, step, loader.epoch, metric=metric, tag=tag)

    # The steps (and evaluations) run on the CUDA stream train.step_stream names; closed in
    # `finally` (an ExitStack keeps the loop at this depth).
    scope = contextlib.ExitStack()
    stream = scope.enter_context(step_stream(cfg.train.step_stream, device))
    if stream is not None:
        log.info("the training step runs on a CUDA stream of priority %d", stream.priority)
    try:
        while step < total_steps:
            epoch_done = True
            timer.wait_start()
            for batch in loader:
                timer.wait_end()
                lr = schedule.apply(optimizer, step)
                with autocast(cfg.train.precision, device):
                    loss, metrics = task.loss(net, batch)
                # Nothing from here to the next batch waits for the GPU, except where we log or
                # checkpoint (see equiav.train.step): the next batch's device stage overlaps it.
                outcome = optimizer_step(
                    loss, params, optimizer, scaler, cfg.optim.grad_clip, master
                )
                step += 1
                skipped.add(step, outcome.nonfinite)
                skipped.poll()  # reads the flags that have arrived; may raise StopTraining
                timer.step_end(len(batch["index"]))
                bar.update(1)
                log_now = step % cfg.train.log_every == 0 or step == total_steps
                if log_now:
                    skipped.poll(wait=True)
                    loss_value = float(outcome.loss)
                    values = {f"train/{k}": float(v) for k, v in metrics.items()}
                    values.update(
                        {
                            "train/loss": loss_value,
                            "train/lr": lr,
                            "train/grad_norm": float(outcome.grad_norm),
                            "train/nonfinite_total": skipped.total,
                        }
                    )
                    values.update({f"perf/{k}": v for k, v in timer.report().items()})
                    logger.log(step, values)
                    if not skipped.last_skipped:
                        history.append({"step": step, "loss": loss_value})
                    bar.update(0, loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                if cfg.train.ckpt_every_steps and step % cfg.train.ckpt_every_steps == 0:
                    save()
                # Agreeing on a stop is a collective and a device sync: with several processes,
                # only at log steps (every rank reaches them together).
                check_stop = dist.world_size == 1 or log_now
                if step >= total_steps or (check_stop and _agree(stop.signal is not None, device)):
                    epoch_done = False
                    break
                timer.wait_start()
            skipped.poll(wait=True)
            if stop.signal is not None or (not epoch_done and step < total_steps):
                path = save()
                log.warning(
                    "stopped by signal %s at step %d; checkpoint %s", stop.signal, step, path
                )
                break
            metric, final = None, step >= total_steps
            if task.evaluate is not None and (
                final or (epoch_done and loader.epoch % cfg.eval.every_epochs == 0)
            ):
                results = task.evaluate(_unwrap(net))
                logger.log(step, {f"eval/{k}": v for k, v in results.items()})
                metric = results.get("metric")
                if metric is not None and (best is None or metric > best):
                    best = metric
            if epoch_done or final:
                save(metric=metric)
    finally:
        scope.close()
        stop.restore()
        bar.close()
        logger.close()
    return {
        "steps": step,
        "epoch": loader.epoch,
        "history": history,
        "nonfinite_total": skipped.total,
        "best_metric": best,
        "checkpoint": str(manager.latest()) if manager.latest() else None,
        "stopped_by_signal": stop.signal,
        "loss_is_finite": all(math.isfinite(h["loss"]) for h in history),
    }
