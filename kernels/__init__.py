"""Numerical kernels the pipelines need and DALI lacks: the Kaldi-exact log-mel filterbank."""

import os


def triton_interpreting() -> bool:
    """Whether Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1, set before
    triton decorates them: the tests), so that the kernels take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
