"""What every benchmark shares: a description of the machine and the result-file writer/reader.

A result is one JSON file `bench/results/{name}-{host}.json` (schema: `bench/report.py`'s module
docstring): a second run of the same benchmark on the same machine replaces the first. Writes are
atomic (a temporary file renamed over the target), so a killed run never leaves half a file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import socket
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from equiav.config import DataConfig, ModelConfig, field_choices
from equiav.train.optim import PRECISIONS
from kernels.fbank import BACKENDS as FBANK_BACKENDS

#: Where results go unless a caller passes `results_dir`.
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Keys every result JSON has (`write_result` fills `benchmark`, `machine` and `created`).
RESULT_KEYS = ("benchmark", "machine", "config", "rows", "summary")

#: What the paper-style loader does (`bench.baseline`): "paper", the original's sample path with
#: the work it does for nothing (`PaperStyleDataset`'s `unused_work`); "lean", without it. Results
#: from before the choice existed measured "lean" (with the fbank images transposed on the CPU
#: and pinned memory, workers kept across epochs: `bench.baseline`'s docstring).
BASELINE_WORK = ("paper", "lean")


class ResultError(ValueError):
    """A result file or payload that does not follow the schema; the message names the file."""


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(*names: str) -> str | None:
    """The installed version of the first distribution found among `names`, else None."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def machine_info() -> dict[str, Any]:
    """Hostname, CPU model and core count, GPUs (name of the first, count), and the versions of
    Python, torch (and its CUDA), DALI and timm."""
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    return {
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "gpu_name": torch.cuda.get_device_name(0) if count else None,
        "gpu_count": count,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        # DALI's distribution name carries the CUDA major version.
        "dali": _package_version(
            "nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110"
        ),
        "timm": _package_version("timm"),
        "platform": platform.platform(),
    }


def _safe_host(hostname: str) -> str:
    """The hostname as a file-name part: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", hostname) or "unknown"


def result_path(name: str, results_dir: str | os.PathLike | None = None) -> Path:
    """`{results_dir}/{name}-{host}.json` (default directory: `bench/results/`)."""
    if not re.fullmatch(r"[A-Za-z0-9_]+(-[A-Za-z0-9_]+)*", name):
        raise ValueError(f"result name {name!r}: use letters, digits, '_' and '-' only")
    directory = Path(results_dir) if results_dir is not None else DEFAULT_RESULTS_DIR
    return directory / f"{name}-{_safe_host(socket.gethostname())}.json"


def check_result(result: Any, source: str) -> dict[str, Any]:
    """Check that `result` has the schema's shape (keys, a list of dict rows, dict config, summary
    and machine); return it, or raise ResultError naming `source`."""
    if not isinstance(result, dict):
        raise ResultError(f"{source}: a result must be a JSON object, got {type(result).__name__}")
    missing = [k for k in RESULT_KEYS if k not in result]
    if missing:
        raise ResultError(f"{source}: result lacks {', '.join(missing)}")
    if not isinstance(result["benchmark"], str):
        raise ResultError(f"{source}: 'benchmark' must be a string")
    for key in ("machine", "config", "summary"):
        if not isinstance(result[key], dict):
            raise ResultError(f"{source}: '{key}' must be an object")
    rows = result["rows"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ResultError(f"{source}: 'rows' must be a list of objects")
    return result


def write_result(
    name: str, payload: dict[str, Any], results_dir: str | os.PathLike | None = None
) -> Path:
    """Write `payload` ({"config", "rows", "summary"}; "machine" is added when absent) as
    `{results_dir}/{name}-{host}.json`, atomically; return the path.

    `benchmark` is set to `name` and `created` to the UTC time of writing.
    """
    path = result_path(name, results_dir)
    result = {"benchmark": name, "machine": payload.get("machine") or machine_info()}
    result.update({k: v for k, v in payload.items() if k not in ("benchmark", "machine")})
    result["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    check_result(result, f"result {name!r}")
    text = json.dumps(result, indent=2, allow_nan=False) + "\n"  # NaN is not JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check one result JSON; errors name the file."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except OSError as e:
        raise ResultError(f"{path}: cannot read: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ResultError(f"{path}: not valid JSON: {e}") from e
    return check_result(result, str(path))


def ran_on_gpu(result: dict[str, Any]) -> bool:
    """Whether a result was measured on a GPU: its `summary.device` when it names one ("cuda" /
    "cpu"), else whether its machine had a GPU."""
    device = result.get("summary", {}).get("device")
    if isinstance(device, str):
        return device.startswith("cuda")
    machine = result.get("machine", {})
    return bool(machine.get("gpu_count")) and machine.get("gpu_name") is not None


def add_loader_gpu_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' flags for the loader's work on a GPU, with the trainer's defaults:
    ``--hw-decoder-load`` (data.hw_decoder_load) and ``--fbank-backend`` (data.fbank_backend)."""
    defaults = DataConfig()
    parser.add_argument(
        "--hw-decoder-load",
        type=float,
        default=defaults.hw_decoder_load,
        help="JPEG frames to the GPU's hardware decoder (data.hw_decoder_load)",
    )
    parser.add_argument(
        "--fbank-backend",
        default=defaults.fbank_backend,
        choices=FBANK_BACKENDS,
        help="the device stage's filterbank (data.fbank_backend; Triton ones need a GPU)",
    )


def parse_list(value: str, allowed: Sequence[str], flag: str, prog: str) -> list[str]:
    """A comma-separated command-line value as its items, each among ``allowed`` (at least
    one); else exits naming ``prog``'s ``--flag``."""
    items = [x for x in value.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"{prog}: --{flag} must be among {list(allowed)}, got {value!r}")
    return items


def model_choices(field: str) -> tuple[str, ...]:
    """A ModelConfig field's choices, as the config declares them (model.gelu, model.qkv, ...)."""
    return field_choices(ModelConfig, field)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' flags for the towers' step levers, with the trainer's defaults:
    ``--gelu`` (model.gelu), ``--qkv`` (model.qkv) and ``--linear`` (model.linear)."""
    defaults = ModelConfig()
    for flag, help in (
        ("gelu", "the towers' GELU (model.gelu)"),
        ("qkv", "the towers' q, k, v GEMMs (model.qkv)"),
        ("linear", "the towers' linear layers' GEMMs (model.linear; float8 changes the numbers)"),
    ):
        parser.add_argument(
            f"--{flag}", default=getattr(defaults, flag), choices=model_choices(flag), help=help
        )


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' ``--precision``: one of the trainer's (``train.precision``); unset means
    ``default_precision``."""
    parser.add_argument(
        "--precision", default=None, choices=PRECISIONS, help="default: bf16 on CUDA, fp32 on CPU"
    )


def default_precision(chosen: str | None, cuda: bool) -> str:
    """``chosen``, else bf16 on CUDA and fp32 on the CPU (where bf16 autocast is slow)."""
    return chosen or ("bf16" if cuda else "fp32")


#: What a GPU kernel does, from its name as the profiler records it (cuBLAS's `nvjet_*` and
#: `*gemm*`, cuDNN's attention, inductor's `triton_{poi,per,red,tem}_fused_<ops>_<n>`): the first
#: match wins, so a Triton GEMM template that took GELU into its epilogue counts as a GEMM, and a
#: fused LayerNorm with its residual add and casts as a LayerNorm. "optimizer" holds the foreach
#: kernels too (gradient clipping, master-weight copies); "input_stage" is the loader's device
#: stage: our Triton kernels (`kernels/fbank.py`, `kernels/augment_triton.py`); "dali" the
#: loader's other GPU work, DALI's own kernels and those of the codecs it calls (nvJPEG's hybrid
#: decoding, nvImageCodec's conversions), by namespace: in a profile of DALI-fed steps the two
#: loader classes are what the input pipeline takes from the step's GPU. Both come first, since
#: DALI's kernel names hold words of the other classes (`dali::kernels::transpose_impl::...`).
KERNEL_CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "input_stage",
        re.compile(
            r"^_(fbank|jitter|jitter_mean|blur|geometry|roll_mask|finish|flip_transpose)_kernel"
        ),
    ),
    ("dali", re.compile(r"\b(?:dali|nvjpeg|nvimgcodec)::")),
    ("attention", re.compile(r"sdpa|flash|fmha|attention|cudnn::fusion", re.I)),
    ("gemm", re.compile(r"nvjet|gemm|xmma|cutlass|triton_tem_", re.I)),
    ("gelu", re.compile(r"gelu", re.I)),
    ("layer_norm", re.compile(r"layer_norm|layernorm", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor_apply", re.I)),
    ("copy", re.compile(r"copy|memcpy|clone|permute|stack|transpose|cat_", re.I)),
)


def kernel_class(name: str) -> str:
    """The class of a GPU kernel (``KERNEL_CLASSES``), "other" when none matches."""
    for label, pattern in KERNEL_CLASSES:
        if pattern.search(name):
            return label
    return "other"


def device_ms_by_class(kernels: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Device time per class, largest first, from (kernel name, device ms) pairs."""
    totals: dict[str, float] = {}
    for name, ms in kernels:
        label = kernel_class(name)
        totals[label] = totals.get(label, 0.0) + ms
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def row_key(row: dict[str, Any]) -> tuple:
    """What a benchmark row measured, apart from its numbers: its pipeline, step stream and the
    CPUs it was pinned to (the fields a row of a repeated run is matched by)."""
    return row.get("pipeline"), row.get("step_stream"), tuple(row.get("pinned_cores") or ())


def median_rows(rounds: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per measurement (``row_key``, in the order first seen) of alternating rounds:
    the row of its median round by samples/s (the lower of the middle two for an even count, so
    that every field of the row comes from one measurement), with each round's samples/s in
    ``round_samples_per_s`` (None where that round's run failed). A measurement that failed in
    every round keeps its first error row."""
    by_key: dict[tuple, list[dict[str, Any] | None]] = {}
    for i, rows in enumerate(rounds):
        for row in rows:
            by_key.setdefault(row_key(row), [None] * len(rounds))[i] = row
    merged = []
    for runs in by_key.values():
        speeds = [
            r["samples_per_s"] if r is not None and r.get("status", "ok") == "ok" else None
            for r in runs
        ]
        measured = [v for v in speeds if v is not None]
        if not measured:
            merged.append(next(r for r in runs if r is not None))
            continue
        median = statistics.median_low(measured)
        chosen = runs[speeds.index(median)]
        values = [None if v is None else round(v, 2) for v in speeds]
        merged.append({**chosen, "round_samples_per_s": values})
    return merged


def whole_rounds(batches: int, workers: int) -> int:
    """The fewest batches >= ``batches`` that are whole rounds of ``workers`` DataLoader workers.

    Why: each worker makes whole batches and the workers run side by side, so their batches
    arrive in rounds of ``workers`` at nearly the same time. A timed window that is not whole
    rounds counts a batch made before it began, or waits for a round it uses one batch of: with
    2 workers, 5 timed batches after 3 warm-up ones take 2 rounds (25 % too fast), after 2 they
    take 3 (17 % too slow); 6 take 3 rounds after either. Whole rounds measure the steady rate,
    whatever the warm-up before them."""
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    rounds = max(workers, 1)
    return -(-batches // rounds) * rounds


def _thread_ids() -> list[int]:
    """This process's threads (Linux: /proc/self/task)."""
    return [int(tid) for tid in os.listdir("/proc/self/task")]


def _set_affinity(tid: int, cpus) -> None:
    with contextlib.suppress(ProcessLookupError):  # a thread that ended since it was listed
        os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def pinned_to_cores(cores: int) -> Iterator[list[int]]:
    """Every thread of this process, and every thread or process started in the block (they
    inherit it), on the first ``cores`` CPUs the process may use; yields those CPUs. Linux only.

    Why: the benchmarks give each loader "``--cores`` cores" as a number of DALI threads or
    DataLoader workers, which on a 16-core GPU machine spread over idle cores, beside the
    training thread, DALI's source workers, the prefetch thread and the paper-style loader's
    pin-memory thread, each on a core of its own. Pinned, the whole training process has the
    CPU share of one GPU on a node (16 cores for 8 GPUs: 2), as the issue's comparison asks.
    On the way out every thread gets back what it had (threads started inside: the process's
    mask from before)."""
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= cores <= len(allowed):
        raise ValueError(f"cannot pin to {cores} cores: this process may use {len(allowed)}")
    chosen = allowed[:cores]
    saved = {}
    for tid in _thread_ids():
        with contextlib.suppress(ProcessLookupError):  # a thread that ended since it was listed
            saved[tid] = os.sched_getaffinity(tid)
    for tid in saved:
        _set_affinity(tid, chosen)
    try:
        yield chosen
    finally:
        for tid in _thread_ids():
            _set_affinity(tid, saved.get(tid, allowed))


def _proc_stat(pid: int | str) -> tuple[int, int] | None:
    """(parent pid, CPU clock ticks) of one process from /proc/<pid>/stat: its threads' user
    and system time, and that of the children it has reaped; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime..cstime fields 14..17.
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def process_tree_cpu_seconds(pid: int | None = None) -> float | None:
    """CPU seconds used so far by process ``pid`` (default: this one), all its threads, every
    live descendant process and every child any of them has reaped. None off Linux.

    Why: a loader's CPU share is the question of the end-to-end comparison, and its work runs in
    threads (DALI's, the prefetch thread, pin-memory) and in worker processes (DALI's source
    workers, the DataLoader's), none of which ``time.process_time`` sees all of. The sum is
    continuous while children exit: a reaped child's time moves into its parent's counts."""
    root = os.getpid() if pid is None else pid
    if not os.path.isdir("/proc/self/task"):
        return None
    parents: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _proc_stat(name)) is not None:
            parents.setdefault(stat[0], []).append(int(name))
            ticks[int(name)] = stat[1]
    if root not in ticks:
        raise ProcessLookupError(f"no process {root}")
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += ticks.get(p, 0)
        todo += parents.get(p, [])
    return total / os.sysconf("SC_CLK_TCK")


def cpu_fields(cpu_start: float | None, seconds: float, samples: int) -> dict[str, float | None]:
    """A timed window's CPU use from ``process_tree_cpu_seconds`` at its start (read again now):
    ``cpu_s``, ``cpu_cores_busy`` (CPU seconds per wall second: how many cores the run kept
    busy) and ``cpu_ms_per_sample``; None values off Linux."""
    end = process_tree_cpu_seconds()
    if cpu_start is None or end is None:
        return {"cpu_s": None, "cpu_cores_busy": None, "cpu_ms_per_sample": None}
    used = end - cpu_start
    return {
        "cpu_s": used,
        "cpu_cores_busy": used / seconds if seconds > 0 else None,
        "cpu_ms_per_sample": 1e3 * used / samples if samples else None,
    }


def cpu_words(comparison: dict[str, Any]) -> str:
    """ "CPU used: X cores DALI-fed, Y paper-style" for an end-to-end comparison whose two runs
    measured their CPU (``dali_cpu_cores_busy``, ``baseline_cpu_cores_busy``); "" otherwise."""
    dali, base = comparison.get("dali_cpu_cores_busy"), comparison.get("baseline_cpu_cores_busy")
    if dali is None or base is None:
        return ""
    return f"CPU used: {dali:.2f} cores DALI-fed, {base:.2f} paper-style"
