"""Config overrides that point a run at the shared synthetic test data (``synth_small``:
4 s clips, 4 frames) with the demo's small geometry, for fast CPU runs of the real code."""


def synthetic_data_overrides(info) -> dict:
    """Dataset files, fbank statistics and clip geometry of ``info`` (a ``SynthInfo``)."""
    return {
        "data.dataset": "synthetic",
        "data.train_json": str(info.root / "train.json"),
        "data.test_json": str(info.root / "test.json"),
        "data.retrieval_json": str(info.root / "retrieval.json"),
        "data.label_csv": str(info.label_csv),
        "data.audio_mean": -4.346,
        "data.audio_std": 4.332,
        "data.clip_seconds": 4.0,
        "data.target_length": 512,
        "data.frames_per_clip": 4,
        "data.eval_frame": 2,
        "data.image_size": 112,
        "data.num_threads": 1,
        "augment.time_mask": 96,
        "augment.ft_timem": 96,
    }
