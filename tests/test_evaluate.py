"""Evaluation: per-class AP / AUC against scikit-learn, d-prime against scipy, retrieval ranks on
planted cases, and the evaluate / retrieval / embed command lines end to end on the synthetic
dataset with tiny checkpoints (single process and two gloo processes under torchrun)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

import evaluate
from equiav import embed as embed_cli
from equiav.config import apply_overrides, config_to_dict, default_config, resolve
from equiav.data.index import read_dataset, read_label_csv
from equiav.metrics import accuracy, average_precision, d_prime, evaluate_scores, roc_auc
from equiav.model import EquiAVFinetune, EquiAVPretrain
from equiav.retrieval import (
    match_ranks,
    median_rank,
    recall_at_k,
    retrieval_metrics,
    similarity,
    top_k_table,
)
from equiav.train.checkpoint import CheckpointManager
from tests.tiny import synthetic_data_overrides

REPO = Path(__file__).resolve().parents[1]


def _sklearn(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-class columns warn
        ap = [average_precision_score(targets[:, c], scores[:, c]) for c in range(scores.shape[1])]
        auc = [roc_auc_score(targets[:, c], scores[:, c]) for c in range(scores.shape[1])]
    return np.array(ap), np.array(auc)


def _scores_and_targets(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Columns: random scores; coarse scores with many ties; float32 ties across both classes; a
    column without positives; a column of positives only; a single positive."""
    rng = np.random.default_rng(seed)
    targets = (rng.uniform(size=(n, 6)) < 0.3).astype(np.float32)
    targets[:, 3] = 0
    targets[:, 4] = 1
    targets[:, 5] = 0
    targets[rng.integers(n), 5] = 1
    scores = rng.normal(size=(n, 6)) + targets
    scores[:, 1] = np.round(scores[:, 1])  # a handful of distinct values
    scores[:, 2] = np.round(scores[:, 2] * 2) / 2
    return scores.astype(np.float32), targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_ap_and_auc_equal_sklearn(seed):
    scores, targets = _scores_and_targets(seed)
    ap, auc = average_precision(scores, targets), roc_auc(scores, targets)
    ref_ap, ref_auc = _sklearn(scores, targets)
    np.testing.assert_allclose(ap, ref_ap, rtol=0, atol=1e-12)
    np.testing.assert_allclose(auc, ref_auc, rtol=0, atol=1e-12)  # NaN where sklearn's is NaN
    assert ap[3] == 0.0 and ap[4] == 1.0 and math.isnan(auc[3]) and math.isnan(auc[4])


def test_all_tied_scores_and_a_one_dimensional_input():
    targets = np.array([1, 0, 1, 0, 0], np.float32)
    scores = np.full(5, 0.3)
    ref_ap, ref_auc = _sklearn(scores[:, None], targets[:, None])
    assert average_precision(scores, targets)[0] == pytest.approx(ref_ap[0], abs=1e-15)
    assert ref_ap[0] == pytest.approx(0.4) and roc_auc(scores, targets)[0] == 0.5 == ref_auc[0]


def test_evaluate_scores_excludes_single_class_columns_and_counts_them():
    scores, targets = _scores_and_targets(3)
    names = [f"class{c}" for c in range(6)]
    out = evaluate_scores(scores, targets, names)
    ref_ap, ref_auc = _sklearn(scores, targets)
    kept = [0, 1, 2, 5]
    assert out["excluded_classes"] == 2 and out["excluded"] == ["class3", "class4"]
    assert out["n_classes_scored"] == 4 and out["n_samples"] == 60
    assert out["mAP"] == pytest.approx(ref_ap[kept].mean(), abs=1e-12)
    assert out["mean_auc"] == pytest.approx(ref_auc[kept].mean(), abs=1e-12)
    assert out["d_prime"] == pytest.approx(np.sqrt(2) * norm.ppf(ref_auc[kept].mean()), abs=1e-9)
    rows = out["per_class"]
    assert [r["positives"] for r in rows] == targets.sum(0).astype(int).tolist()
    assert rows[3]["ap"] is None and rows[4]["auc"] is None and not rows[4]["scored"]
    assert rows[5]["ap"] == pytest.approx(ref_ap[5], abs=1e-12)


def test_d_prime_is_sqrt2_times_the_normal_quantile():
    for auc in (0.5, 0.6, 0.75, 0.9, 0.999, 0.2):
        assert d_prime(auc) == pytest.approx(np.sqrt(2) * norm.ppf(auc), abs=1e-9)
    assert d_prime(0.5) == 0.0 and d_prime(1.0) == math.inf and d_prime(0.0) == -math.inf
    assert math.isnan(d_prime(math.nan))


def test_accuracy_is_argmax_against_argmax_of_the_target():
    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    targets = np.array([[0, 1, 0], [0, 0, 1], [0, 0, 1], [0.3, 0.7, 0.0]])  # last: soft (mixup)
    assert accuracy(scores, targets) == 0.5
    assert evaluate_scores(scores, targets, ["a", "b", "c"])["accuracy"] == 0.5


# ----------------------------------------------------------------------------------------------
# Retrieval on planted cases


def test_identical_embeddings_retrieve_themselves():
    z = np.random.default_rng(0).normal(size=(20, 8))
    out = retrieval_metrics(z, 3.0 * z)  # scale does not matter: embeddings are L2-normalised
    for direction in ("audio_to_visual", "visual_to_audio"):
        assert out[direction] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "median_rank": 1.0}


def test_a_permutation_ranks_its_moved_clips_second():
    """One-hot embeddings, visual rows permuted: a clip that stays in place has similarity 1 with
    its match (rank 1); a moved clip's match scores 0, below its permuted partner's 1 and tied
    with the rest (rank 2)."""
    n = 12
    perm = np.arange(n)
    perm[[0, 1, 2]] = [1, 2, 0]
    perm[[5, 6]] = [6, 5]
    za, zv = np.eye(n), np.eye(n)[perm]
    out = retrieval_metrics(za, zv, ks=(1, 2))
    moved = np.sum(perm != np.arange(n))
    for direction in ("audio_to_visual", "visual_to_audio"):
        assert out[direction]["R@1"] == pytest.approx((n - moved) / n)
        assert out[direction]["R@2"] == 1.0
        assert out[direction]["median_rank"] == 1.0
    ranks = match_ranks(similarity(za, zv))
    assert ranks.tolist() == [2 if p != i else 1 for i, p in enumerate(perm)]


def test_planted_ranks_recall_median_and_top_k():
    rng = np.random.default_rng(1)
    n = 15
    sim = rng.uniform(0.0, 0.5, size=(n, n))
    np.fill_diagonal(sim, 0.9)
    want = np.ones(n, int)
    for i, better in [(0, 3), (1, 7), (2, 12), (3, 1), (4, 5)]:
        others = [j for j in range(n) if j != i][:better]
        sim[i, others] = 0.95  # planted: `better` items above the match
        want[i] = better + 1
    assert match_ranks(sim).tolist() == want.tolist()
    rec = recall_at_k(sim, (1, 5, 10))
    assert rec == {k: float(np.mean(want <= k)) for k in (1, 5, 10)}
    assert rec[1] == 10 / 15 and rec[5] == 12 / 15 and rec[10] == 14 / 15
    assert median_rank(sim) == float(np.median(want)) == 1.0
    ids = [f"clip{i}" for i in range(n)]
    rows = top_k_table(sim, ids, k=10)
    assert rows[1]["rank"] == 8 and rows[1]["query"] == "clip1"
    assert [rows[1][f"top_{j}"] for j in range(1, 9)] == [
        f"clip{j}" for j in (0, 2, 3, 4, 5, 6, 7, 1)
    ]
    assert rows[7]["top_1"] == "clip7" and rows[7]["direction"] == "audio_to_visual"


# ----------------------------------------------------------------------------------------------
# The command lines on the synthetic dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from equiav.data.synth import generate

    out = tmp_path_factory.mktemp("eval_data")
    # 10 clips: 3 train, 7 test (an odd count: two ranks hold 4 and 3).
    return generate(
        out, clips=10, classes=3, seed=0, video_format=("frames",), seconds=4.0,
        test_fraction=0.7, workers=1,
    )  # fmt: skip


def _tiny_config(info, mode: str):
    overrides = {
        **synthetic_data_overrides(info),
        "model.embed_dim": 64,
        "model.depth": 2,
        "model.num_heads": 4,
        "model.aug_hidden": 32,
        "model.head_hidden": 128,
        "model.head_out": 32,
        "model.predictor_heads": 4,
        "model.predictor_head_dim": 16,
        "model.cen_num": 4,
        "model.ft_proj_dim": 32,
        "train.batch_size": 3,
        "train.precision": "fp32",
        "eval.retrieval_frame": 1,
    }
    return resolve(apply_overrides(default_config(mode), overrides))


def _save_checkpoint(directory: Path, task: str, model, cfg) -> Path:
    state = {"task": task, "model": model.state_dict(), "config": config_to_dict(cfg)}
    return CheckpointManager(directory).save(state, step=1, epoch=1, tag="final")


@pytest.fixture(scope="module")
def finetune_ckpt(data, tmp_path_factory):
    cfg = _tiny_config(data, "finetune")
    torch.manual_seed(0)
    model = EquiAVFinetune(cfg.model, cfg.data, 3)
    with torch.no_grad():  # spread the logits so that classes are ranked, not nearly tied
        model.classifier.weight.mul_(50.0)
    return _save_checkpoint(tmp_path_factory.mktemp("ft"), "finetune", model, cfg), model, cfg


@pytest.fixture(scope="module")
def pretrain_ckpt(data, tmp_path_factory):
    cfg = _tiny_config(data, "pretrain")
    torch.manual_seed(1)
    model = EquiAVPretrain(cfg.model, cfg.data)
    return _save_checkpoint(tmp_path_factory.mktemp("pt"), "pretrain", model, cfg), model, cfg


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_cli_single_and_two_processes(data, finetune_ckpt, tmp_path, monkeypatch):
    """metrics.json and per_class.csv from one process equal the scikit-learn metrics of the
    model's own logits, and two gloo processes under torchrun (7 samples: 4 + 3) give the same
    numbers with every sample counted once."""
    from dali_pipelines.loader import build_loader

    # Everything on the CPU in float32, also on a GPU machine (where evaluate.py would otherwise
    # score bf16 logits and 7 samples make a swapped rank visible in the mAP).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path, model, cfg = finetune_ckpt
    common = ["--checkpoint", str(path), "--data", str(data.root / "test.json")]
    common += ["--label-csv", str(data.label_csv), "--set", "data.num_threads=1"]
    assert evaluate.main([*common, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())

    # The reference: the model's logits on the eval loader, scored by scikit-learn.
    loader = build_loader(cfg, "test", "eval")
    logits, targets = {}, {}
    model.eval()
    with torch.no_grad():
        for batch in loader:
            for i, s, t in zip(batch["index"], model(batch["audio"], batch["visual"]),
                               batch["labels"], strict=True):  # fmt: skip
                logits[int(i)], targets[int(i)] = s.numpy(), t.numpy()
    assert sorted(logits) == list(range(7))
    scores = np.stack([logits[i] for i in range(7)])
    labels = np.stack([targets[i] for i in range(7)])
    ref_ap, ref_auc = _sklearn(scores, labels)
    kept = (labels.sum(0) > 0) & (labels.sum(0) < 7)
    assert one["n_samples"] == 7 == one["n_entries"] and one["skipped"] == []
    assert one["excluded_classes"] == int((~kept).sum())
    assert one["mAP"] == pytest.approx(ref_ap[kept].mean(), abs=1e-6)
    assert one["mean_auc"] == pytest.approx(ref_auc[kept].mean(), abs=1e-6)
    assert one["accuracy"] == pytest.approx(np.mean(scores.argmax(1) == labels.argmax(1)))
    assert one["metric_name"] == "mAP" and one["metric"] == one["mAP"]
    rows = _read_csv(tmp_path / "one" / "per_class.csv")
    names = read_label_csv(data.label_csv).names
    assert [r["name"] for r in rows] == list(names)
    assert [int(r["positives"]) for r in rows] == labels.sum(0).astype(int).tolist()
    for r, ap, k in zip(rows, ref_ap, kept, strict=True):
        assert (float(r["ap"]) == pytest.approx(ap, abs=1e-6)) if k else r["ap"] == ""

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "evaluate.py", *common, "--out", str(tmp_path / "two")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["n_samples"] == 7
    for key in ("mAP", "mean_auc", "accuracy", "excluded_classes"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    two_rows = _read_csv(tmp_path / "two" / "per_class.csv")
    assert [r["positives"] for r in two_rows] == [r["positives"] for r in rows]


def test_evaluate_model_reports_the_selection_metric(data, finetune_ckpt):
    from dali_pipelines.loader import build_loader

    _, model, cfg = finetune_ckpt
    loader = build_loader(cfg, "test", "eval")
    names = loader.labels.names
    model.train()
    out = evaluate.evaluate_model(model, loader, names, metric="accuracy")
    assert model.training  # put back as it was
    assert out["metric"] == out["accuracy"] and out["n_samples"] == 7.0
    assert all(isinstance(v, float) for v in out.values())
    again = evaluate.evaluate_model(model, loader, names, metric="mAP")  # a second epoch
    assert again["metric"] == again["mAP"] == pytest.approx(out["mAP"], abs=1e-6)


def test_retrieval_cli_and_embedding_export(data, pretrain_ckpt, tmp_path, capsys):
    path, _, _ = pretrain_ckpt
    args = ["--checkpoint", str(path), "--data", str(data.root / "retrieval.json"),
            "--set", "data.num_threads=1"]  # fmt: skip
    assert evaluate.main(["retrieval", *args, "--out", str(tmp_path / "ret")]) == 0
    result = json.loads((tmp_path / "ret" / "retrieval.json").read_text())
    assert result["n"] == 7 and result["frame"] == 1 and result["seeded"]
    rows = _read_csv(tmp_path / "ret" / "retrieval_top10.csv")
    ids = [e.video_id for e in read_dataset(data.root / "retrieval.json")]
    assert len(rows) == 14 and [r["query"] for r in rows[:7]] == ids
    for direction in ("audio_to_visual", "visual_to_audio"):
        ranks = np.array([int(r["rank"]) for r in rows if r["direction"] == direction])
        for k in (1, 5, 10):
            assert result[direction][f"R@{k}"] == pytest.approx(np.mean(ranks <= k))
        assert result[direction]["median_rank"] == float(np.median(ranks))
    assert "top_7" in rows[0] and "top_8" not in rows[0]  # only 7 items to list

    # The export: same clips, same (seeded) embeddings, so the same retrieval numbers. Without a
    # label CSV (the saved one is "missing" here), labels are taken from the dataset itself.
    missing = ["--set", f"data.label_csv={tmp_path / 'missing.csv'}"]
    npz = tmp_path / "emb.npz"
    assert embed_cli.main([*args, *missing, "--out", str(npz)]) == 0
    emb = np.load(npz)
    assert emb["video_ids"].tolist() == ids and emb["audio"].shape == (7, 32)
    np.testing.assert_allclose(np.linalg.norm(emb["audio"], axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb["visual"], axis=1), 1.0, atol=1e-6)
    again = retrieval_metrics(emb["audio"], emb["visual"])
    for direction in ("audio_to_visual", "visual_to_audio"):
        for key, value in again[direction].items():
            assert result[direction][key] == pytest.approx(value), (direction, key)

    # The cen vectors matter: the unseeded draws (the original's) give other embeddings.
    npz2 = tmp_path / "emb_unseeded.npz"
    unseeded = ["--set", "quirks.retrieval_seeded=false", "--label-csv", str(data.label_csv)]
    assert embed_cli.main([*args, *unseeded, "--out", str(npz2)]) == 0
    other = np.load(npz2)
    assert other["video_ids"].tolist() == ids
    assert not np.allclose(other["audio"], emb["audio"], atol=1e-4)


def test_wrong_checkpoint_kind_is_a_clear_error(data, pretrain_ckpt, tmp_path, capsys):
    path, _, _ = pretrain_ckpt
    code = evaluate.main(["--checkpoint", str(path), "--data", str(data.root / "test.json"),
                          "--label-csv", str(data.label_csv), "--out", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "'pretrain' checkpoint" in err and "finetune" in err
    assert not (tmp_path / "metrics.json").exists()


def test_classification_without_a_label_csv_names_the_missing_one(
    data, finetune_ckpt, tmp_path, capsys
):
    """The saved data.label_csv, overridden by --set to a file that does not exist and no
    --label-csv: classification needs labels, so it stops and names the file."""
    path, _, _ = finetune_ckpt
    missing = tmp_path / "missing.csv"
    args = ["--checkpoint", str(path), "--data", str(data.root / "test.json")]
    code = evaluate.main([*args, "--set", f"data.label_csv={missing}", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--label-csv" in err and str(missing) in err
