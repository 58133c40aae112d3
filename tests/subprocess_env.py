"""The environment of the tests' Triton-interpreter subprocesses."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def interpreter_env() -> dict[str, str]:
    """This process's environment with TRITON_INTERPRET=1 and the repository first on
    PYTHONPATH. The caller's PYTHONPATH is kept after it: on the GPU machine DALI, PyAV and
    soundfile are importable only through it (a subprocess without them failed there)."""
    path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
