"""Shared pytest set-up: the `cuda` marker skips its tests on machines without a GPU."""

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_tf32():
    """Put the process-wide TF32 switches back after every test. The trainer and bench.step
    turn TF32 on for the GPU (as train.tf32 does), and a test that runs them in-process left
    it on for every test after it: on an H200 (2026-11-27) test_bias_gelu_on_cuda's float32
    comparison of the compiled MLP with timm's then failed at TF32's 1e-3 precision."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """A small real synthetic dataset (webm + frames + wav), shared by the data-path tests.

    12 clips of 4 s (8 train, 4 test), 4 classes; frames_per_clip is 4 for this clip length.
    """
    from equiav.data.synth import generate

    out = tmp_path_factory.mktemp("synth_small")
    return generate(
        out,
        clips=12,
        classes=4,
        seed=0,
        video_format=("webm", "frames"),
        seconds=4.0,
        test_fraction=1 / 3,
        workers=2,
    )


@pytest.fixture
def check_trust(monkeypatch) -> list[bool]:
    """The ``trust_cache`` argument of every dataset check made while the test runs, in order
    (the real check runs)."""
    import equiav.data.check as check

    calls: list[bool] = []
    real = check.check_dataset

    def spy(*args, **kwargs):
        calls.append(kwargs["trust_cache"])
        return real(*args, **kwargs)

    monkeypatch.setattr(check, "check_dataset", spy)
    return calls


@pytest.fixture(params=["gather", "where"])
def selection(request, monkeypatch):
    """How ``kernels.augment`` applies an op to some samples of a batch: as on a CPU (on the
    active samples' slices) or as on a GPU (whole batch, then ``where``)."""
    from kernels import augment as K

    monkeypatch.setattr(K, "whole_batch_ops", lambda x: request.param == "where")
    return request.param
