"""``make demo`` at a small size: every stage runs and the summary holds the table's numbers."""

import json

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end_at_a_small_size(tmp_path):
    from equiav.demo import main

    data = tmp_path / "data"
    args = [
        "--config",
        "configs/demo.yaml",
        "--set",
        f"data.train_json={data}/train.json",
        "--set",
        f"data.val_json={data}/test.json",
        "--set",
        f"data.test_json={data}/test.json",
        "--set",
        f"data.retrieval_json={data}/retrieval.json",
        "--set",
        f"data.label_csv={data}/class_labels_indices.csv",
        "--set",
        f"data.weights_csv={data}/weights.csv",
        "--set",
        f"train.save_path={tmp_path}/run",
        "--set",
        "train.batch_size=4",
        "--set",
        "eval.batch_size=4",
        "--set",
        "model.depth=1",
        "--clips",
        "24",
        "--classes",
        "3",
        "--shots",
        "2",
        "--seeds",
        "1",
        "--pretrain-steps",
        "4",
        "--finetune-steps",
        "4",
    ]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "demo_summary.json").read_text())
    assert summary["pretrain"]["steps"] == 4
    assert set(summary["finetune"]) == {"pretrained", "scratch"}
    assert all(0 < m <= 1 for runs in summary["finetune"].values() for m in runs)
    assert summary["retrieval"]["n"] == 7
    assert 0 <= summary["retrieval"]["audio_to_visual"]["R@10"] <= 1
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert "held-out mAP" in summary["table"][2]
