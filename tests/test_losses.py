"""EquiAV's losses and distributed gathers (equiav/losses.py, equiav/train/dist.py).

Three kinds of check:
- on one process, every loss against a slow reference written from the definition (python loops
  over samples, -log of a softmax spelled out), values and gradients;
- a process group of size 1 (gloo): the gathers' real code path changes nothing;
- two gloo processes with a tiny model under DDP: the per-rank losses average to the
  single-process loss on the concatenated batch and the DDP-averaged gradients equal the
  single-process gradients; with the original's no-gradient inter-modal gather they equal the
  gradients of the same loss with the inter-modal keys detached instead, which differ from the
  true ones.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from equiav.losses import EMBEDDING_KEYS, equiav_loss, info_nce, nt_xent
from equiav.train import dist as edist

TAU = 0.07


# ----------------------------------------------------------------------------------------------
# The slow reference: the definitions, one sample at a time.


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum())


def _neg_log_softmax(scores: list[torch.Tensor], positive: int) -> torch.Tensor:
    """-log(exp(s_pos) / sum_j exp(s_j))."""
    return -torch.log(torch.exp(scores[positive]) / sum(torch.exp(s) for s in scores))


def _argmax(scores: list[torch.Tensor]) -> int:
    return max(range(len(scores)), key=lambda j: float(scores[j].detach()))


def ref_info_nce(za: torch.Tensor, zv: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(loss, top-1 audio->visual, top-1 visual->audio)."""
    a, v = [_unit(r) for r in za], [_unit(r) for r in zv]
    n = len(a)
    loss_a = loss_v = 0.0
    hits_a = hits_v = 0
    for i in range(n):
        sa = [torch.dot(a[i], v[j]) / TAU for j in range(n)]
        sv = [torch.dot(v[i], a[j]) / TAU for j in range(n)]
        loss_a = loss_a + _neg_log_softmax(sa, i)
        loss_v = loss_v + _neg_log_softmax(sv, i)
        hits_a += _argmax(sa) == i
        hits_v += _argmax(sv) == i
    return (loss_a / n + loss_v / n) / 2, hits_a / n, hits_v / n


def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(loss, top-1 over both directions). Candidates of sample i of one side: every sample of
    the other side (its partner is the positive) and every other sample of its own side."""
    p, q = [_unit(r) for r in z1], [_unit(r) for r in z2]
    n = len(p)
    total = 0.0
    hits = 0
    for own, other in ((p, q), (q, p)):
        for i in range(n):
            scores = [torch.dot(own[i], other[j]) / TAU for j in range(n)]
            scores += [torch.dot(own[i], own[k]) / TAU for k in range(n) if k != i]
            total = total + _neg_log_softmax(scores, i) / n
            hits += _argmax(scores) == i
    return total / 2, hits / (2 * n)


def _embeddings(batch: int, dim: int, seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Six embeddings whose partners are correlated (so that accuracies are neither 0 nor 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for side in ("a", "v"):
        base = torch.randn(batch, dim, generator=g, dtype=dtype)
        out[f"z_equi_{side}"] = base + 0.8 * torch.randn(batch, dim, generator=g, dtype=dtype)
        out[f"z_aug_{side}"] = base + 0.8 * torch.randn(batch, dim, generator=g, dtype=dtype)
    base = torch.randn(batch, dim, generator=g, dtype=dtype)
    out["z_inv_a"] = base + 0.8 * torch.randn(batch, dim, generator=g, dtype=dtype)
    out["z_inv_v"] = base + 0.8 * torch.randn(batch, dim, generator=g, dtype=dtype)
    return {k: v.requires_grad_() for k, v in out.items()}


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


# ----------------------------------------------------------------------------------------------
# One process.


def test_info_nce_matches_definition():
    z = _embeddings(6, 5, seed=1)
    za, zv = z["z_inv_a"], z["z_inv_v"]
    got = info_nce(za, zv, TAU, gather=None)
    want, _, _ = ref_info_nce(za, zv)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, w in zip(_grads(got, [za, zv]), _grads(want, [za, zv]), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_nt_xent_matches_definition():
    z = _embeddings(6, 5, seed=2)
    z1, z2 = z["z_equi_a"], z["z_aug_a"]
    got = nt_xent(z1, z2, TAU, gather=None)
    want, _ = ref_nt_xent(z1, z2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, w in zip(_grads(got, [z1, z2]), _grads(want, [z1, z2]), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_equiav_loss_matches_definition():
    z = _embeddings(8, 6, seed=3)
    got = equiav_loss(z, TAU)
    inter, acc_a2v, acc_v2a = ref_info_nce(z["z_inv_a"], z["z_inv_v"])
    intra_a, acc_intra_a = ref_nt_xent(z["z_equi_a"], z["z_aug_a"])
    intra_v, acc_intra_v = ref_nt_xent(z["z_equi_v"], z["z_aug_v"])
    want = {
        "inter": inter,
        "intra_a": intra_a,
        "intra_v": intra_v,
        "total": (inter + intra_a + intra_v) / 3,
    }
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-12, msg=key)
    accs = {"acc_a2v": acc_a2v, "acc_v2a": acc_v2a}
    accs |= {"acc_intra_a": acc_intra_a, "acc_intra_v": acc_intra_v}
    for key, value in accs.items():
        assert not got[key].requires_grad
        assert got[key].item() == pytest.approx(value, abs=1e-12), key
    # The inputs were built so that the accuracies say something (neither all wrong nor right).
    assert any(0 < v < 1 for v in accs.values()), accs


def test_logits_are_float32_under_autocast():
    z = _embeddings(16, 512, seed=4, dtype=torch.float32)
    exact = equiav_loss(z, TAU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = equiav_loss(z, TAU)
        # What the losses avoid: the same inter-modal logits left to autocast come out in bf16.
        naive = F.normalize(z["z_inv_a"], dim=-1) @ F.normalize(z["z_inv_v"], dim=-1).T / TAU
    assert naive.dtype == torch.bfloat16
    exact_logits = F.normalize(z["z_inv_a"], dim=-1) @ F.normalize(z["z_inv_v"], dim=-1).T / TAU
    assert (naive.float() - exact_logits).abs().max() > 1e-2
    for key in ("inter", "intra_a", "intra_v", "total"):
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], exact[key], rtol=0, atol=1e-6, msg=key)


def test_bad_arguments_are_refused():
    z = _embeddings(4, 3, seed=5)
    with pytest.raises(ValueError, match="gather"):
        info_nce(z["z_inv_a"], z["z_inv_v"], gather="sum")
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(z["z_equi_a"], z["z_aug_a"][:3], gather=None)
    with pytest.raises(KeyError, match="z_aug_v"):
        equiav_loss({k: v for k, v in z.items() if k != "z_aug_v"})


def test_init_distributed_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = edist.init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert info.is_main and edist.is_main() and not dist.is_initialized()
    edist.barrier()  # nothing to wait for: must not raise
    edist.destroy()
    with pytest.raises(ValueError, match="backend"):
        edist.init_distributed("mpi")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="LOCAL_RANK"):
        edist.init_distributed("gloo")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def test_world_size_one_gathers_change_nothing(monkeypatch):
    """A real gloo group of one process: the gathers run their collective code path, and
    gather="grad" / "nograd" give the same losses and gradients as gather=None."""
    for name, value in _torchrun_env(0, 1, _free_port()).items():
        monkeypatch.setenv(name, value)
    info = edist.init_distributed("gloo")
    try:
        assert (info.rank, info.world_size) == (0, 1) and dist.get_backend() == "gloo"
        z = _embeddings(5, 4, seed=6)
        gathered = edist.all_gather_with_grad(z["z_inv_a"])
        assert "GatherWithGrad" in type(gathered.grad_fn).__name__  # the collective path ran
        torch.testing.assert_close(gathered, z["z_inv_a"], rtol=0, atol=0)
        pairs = {"info_nce": ("z_inv_a", "z_inv_v"), "nt_xent": ("z_equi_v", "z_aug_v")}
        for name, fn in (("info_nce", info_nce), ("nt_xent", nt_xent)):
            x1, x2 = (z[k] for k in pairs[name])
            base = fn(x1, x2, TAU, gather=None)
            base_grads = _grads(base, [x1, x2])
            for gather in ("grad", "nograd"):
                loss = fn(x1, x2, TAU, gather=gather)
                torch.testing.assert_close(loss, base, rtol=0, atol=1e-12, msg=name)
                for g, w in zip(_grads(loss, [x1, x2]), base_grads, strict=True):
                    torch.testing.assert_close(g, w, rtol=0, atol=1e-12, msg=f"{name} {gather}")
    finally:
        edist.destroy()
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------------------------
# Two processes under DDP against one process on the concatenated batch.

WORLD = 2
LOCAL_BATCH = 4
IN_DIM = 10
EMB_DIM = 8


def _tiny_model() -> torch.nn.Module:
    """A Linear producing the six embeddings at once (float64, identical on every rank)."""
    torch.manual_seed(0)
    return torch.nn.Linear(IN_DIM, 6 * EMB_DIM, dtype=torch.float64)


def _global_inputs() -> torch.Tensor:
    return torch.randn(
        WORLD * LOCAL_BATCH, IN_DIM, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )


def _split(y: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(zip(EMBEDDING_KEYS, y.chunk(6, dim=1), strict=True))


def _ddp_worker(rank: int, port: int, result_dir: str) -> None:
    # CPU and gloo even where a GPU exists: LOCAL_RANK 1 may have no GPU of its own.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.update(_torchrun_env(rank, WORLD, port))
    info = edist.init_distributed()
    try:
        assert dist.get_backend() == "gloo" and info.device.type == "cpu"
        model = _tiny_model()
        ddp = DistributedDataParallel(model)
        x = _global_inputs()[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]
        result: dict = {
            "gather_grad": edist.all_gather_with_grad(x).detach(),
            "gather_nograd": edist.all_gather_no_grad(x.clone().requires_grad_()),
        }
        for with_grad in (True, False):
            ddp.zero_grad(set_to_none=True)
            losses = equiav_loss(_split(ddp(x)), TAU, inter_gather_with_grad=with_grad)
            losses["total"].backward()
            result[with_grad] = {
                "losses": {k: v.detach() for k, v in losses.items()},
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            }
        torch.save(result, Path(result_dir) / f"rank{rank}.pt")
    finally:
        edist.destroy()


def _run_two_processes(result_dir: Path, deadline_s: float = 120.0) -> list[dict]:
    ctx = mp.spawn(_ddp_worker, args=(_free_port(), str(result_dir)), nprocs=WORLD, join=False)
    start = time.monotonic()
    while not ctx.join(timeout=1.0):  # raises if a worker failed
        if time.monotonic() - start > deadline_s:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"the {WORLD} gloo workers did not finish in {deadline_s} s")
    return [torch.load(result_dir / f"rank{r}.pt") for r in range(WORLD)]


def _inter_keys_detached(za: torch.Tensor, zv: torch.Tensor) -> torch.Tensor:
    """The inter-modal InfoNCE with the keys (the gathered side) cut from the graph: what the
    original's no-gradient gather differentiates (queries only)."""
    a, v = F.normalize(za, dim=-1), F.normalize(zv, dim=-1)
    labels = torch.arange(a.shape[0])
    return (
        F.cross_entropy(a @ v.detach().T / TAU, labels)
        + F.cross_entropy(v @ a.detach().T / TAU, labels)
    ) / 2


def test_two_processes_match_one_process(tmp_path):
    results = _run_two_processes(tmp_path)
    x = _global_inputs()

    # The gathers: rank order, and no gradient at all from the original's.
    for r in results:
        torch.testing.assert_close(r["gather_grad"], x, rtol=0, atol=0)
        torch.testing.assert_close(r["gather_nograd"], x, rtol=0, atol=0)
        assert not r["gather_nograd"].requires_grad

    # One process on the concatenated batch (no process group here: the gathers are identities).
    model = _tiny_model()
    out = _split(model(x))
    single = equiav_loss(out, TAU)
    single["total"].backward()
    grads_true = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    out = _split(model(x))
    intra = nt_xent(out["z_equi_a"], out["z_aug_a"], TAU, None)
    intra = intra + nt_xent(out["z_equi_v"], out["z_aug_v"], TAU, None)
    ((_inter_keys_detached(out["z_inv_a"], out["z_inv_v"]) + intra) / 3).backward()
    grads_keys_detached = {n: p.grad.clone() for n, p in model.named_parameters()}

    for with_grad in (True, False):
        # Each rank's loss covers its own rows; their mean is the global mean, whatever the
        # gather (the forward values do not depend on it), accuracies included.
        for key, value in single.items():
            mean = sum(r[with_grad]["losses"][key] for r in results) / WORLD
            torch.testing.assert_close(mean, value.detach(), rtol=0, atol=1e-12, msg=key)
        # DDP leaves the same averaged gradients on every rank.
        for name in grads_true:
            torch.testing.assert_close(
                results[0][with_grad]["grads"][name], results[1][with_grad]["grads"][name]
            )

    # Gathered with gradient: exactly the single-process gradients.
    for name, want in grads_true.items():
        torch.testing.assert_close(results[0][True]["grads"][name], want, rtol=0, atol=1e-12)

    # The original's no-gradient gather: each rank differentiates its own rows only as queries,
    # so the DDP average is exactly the gradient of the single-process loss whose inter-modal
    # keys are detached. That is not the true gradient: the keys' share of the inter-modal
    # gradient is missing, with no simple factor between the two (measured relative difference
    # of the total loss's gradient here: 0.33 on the weight, 0.26 on the bias).
    for name, want in grads_keys_detached.items():
        torch.testing.assert_close(results[0][False]["grads"][name], want, rtol=0, atol=1e-12)
    for name in ("weight", "bias"):
        got, true = results[0][False]["grads"][name], grads_true[name]
        assert (got - true).norm() / true.norm() > 0.05, name
