"""Loader start-up at dataset scale: what a training process and its DALI workers hold and spend
before the first batch, for a list the size of AudioSet-2M.

    python -m bench.startup [--entries 2000000] [--check-entries 100000] [--py-workers 2]
                            [--data runs/bench-data --seconds 10] [--smoke]

On an 8-GPU node every training process reads the dataset list, builds its sample source, and
DALI pickles that source into each of its spawned source workers (`data.py_workers`): 8 x (1 +
workers) copies of whatever the source holds. This benchmark writes a list of `--entries`
entries over the media of the synthetic dataset (each entry one of its webm clips under an id of
its own, so every entry is readable), then measures, each phase in a fresh process (so that the
peak resident memory, VmHWM, is the phase's own):

- `read`: `read_dataset` of the list: seconds, resident MiB after it (the list) and at the peak
  (the parsed JSON, freed before it returns); and the seconds to load it from the checker's
  cache of the parsed table (`cached_s`: what every start after the first does);
- `source`: the `pretrain` sample source over it (`SampleSource`: label rows, epoch order):
  seconds and MiB it adds; the size of its pickle (what each spawned worker receives) and the
  seconds to pickle and to unpickle it;
- `loader`: a pretraining `DaliLoader` with `--py-workers` source workers on the CPU: seconds to
  the first batch; the training process's resident and anonymous (heap) MiB, its children's
  (the workers and multiprocessing's resource tracker) anonymous MiB, and the proportional
  memory (Pss: shared pages split among the processes that map them) of all of them;
- `check`: the dataset checker (`check_dataset`, run by every loader at start) on lists of
  `--check-entries` and a fifth of that: cold (no cache yet), from its cache with every media
  file stat-ed again (what rank 0 does at each start) and trusting the cache (`trust_cache`:
  the other ranks), with the default workers (one per core).

Rows: one per phase and list (`phase`, `entries`, then the phase's numbers). Summary: the host
memory of a rank's processes (`rank_pss_mib`) and of an 8-GPU node's (`node_gib`: 8 ranks; an
upper bound, since 8 ranks share more library pages than one), a rank's seconds to its first
batch, and each kind of check's cost per entry (the slope between the two check sizes, so the
worker pool's start is left out) and its seconds at the list's length (extrapolated linearly).
Writes `bench/results/startup-<host>.json` (`startup-smoke-<host>.json` with `--smoke`).

Measured on the 2-core VM with 2M entries before the list became columns (`EntryTable`) and
the labels sparse rows (`LabelRows`), by the same phases: read 24.2 s and 1596 MiB; the source
44.0 s and +8325 MiB (a dense 2M x 527 float32 label matrix); its pickle 4277 MiB, 31.9 s to
write and 23.9 s to read, in each worker.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import write_result

PHASES = ("read", "source", "loader", "check")


def _proc_mib(pid: int | str, file: str, keys: Sequence[str]) -> dict[str, float]:
    """The `keys` lines of `/proc/{pid}/{file}` (kB values), in MiB (Linux)."""
    out = {}
    with open(f"/proc/{pid}/{file}") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) / 1024
    return out


def _status_mib() -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (peak resident) of this process, in MiB."""
    return _proc_mib("self", "status", ("VmRSS", "VmHWM"))


def _memory_mib(pid: int | str = "self") -> dict[str, float]:
    """Rss (resident), Pss (proportional: shared pages split among their users) and Anonymous
    (heap: what the process itself allocated) memory of a process, in MiB."""
    return _proc_mib(pid, "smaps_rollup", ("Rss", "Pss", "Anonymous"))


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (every thread's children, from /proc)."""
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return kids


def write_list(pool_json: Path, out: Path, entries: int, classes: int, seed: int = 0) -> Path:
    """A dataset JSON of `entries` entries cycling over the clips of `pool_json`, each under an
    id of its own (the media are shared: every entry reads real files), labelled with 1 +
    Poisson(1) of `classes` classes (AudioSet-2M: 527 classes, about 2 labels per clip), and
    their label CSV beside it; returns the label CSV's path."""
    import numpy as np

    from equiav.data.index import write_label_csv

    pool = json.loads(pool_json.read_text())["data"]
    base = pool_json.resolve().parent
    mids = [f"/m/{k:05x}" for k in range(classes)]
    labels_csv = out.with_name(f"{out.stem}_labels.csv")
    write_label_csv(labels_csv, mids, [f"class {k}" for k in range(classes)])
    rng = np.random.default_rng(seed)
    counts = np.minimum(1 + rng.poisson(1.0, entries), min(10, classes))
    with open(out, "w", encoding="utf-8") as f:
        f.write('{"data": [\n')
        for i in range(entries):
            e = pool[i % len(pool)]
            picked = rng.choice(classes, int(counts[i]), replace=False)
            item = {
                "video_id": f"{e['video_id']}-{i}",
                "wav": str(base / e["wav"]),
                "video_path": str(base / e["video_path"]),
                "labels": ",".join(mids[k] for k in picked),
            }
            f.write(("," if i else "") + json.dumps(item) + "\n")
        f.write("]}\n")
    return labels_csv


def _phase_read(a: argparse.Namespace) -> dict[str, Any]:
    from equiav.data.check import _read_entries
    from equiav.data.index import read_dataset

    before = _status_mib()["VmRSS"]
    t = time.perf_counter()
    table = read_dataset(a.list)
    seconds = time.perf_counter() - t
    mem = _status_mib()
    _read_entries(Path(a.list))  # parses again and writes the checker's cache of the table
    t = time.perf_counter()
    cached = _read_entries(Path(a.list))
    cached_s = time.perf_counter() - t
    if len(cached) != len(table):
        raise RuntimeError("the cached table differs from the JSON's")
    return {
        "entries": len(table),
        "seconds": seconds,
        "held_mib": mem["VmRSS"] - before,
        "peak_mib": mem["VmHWM"] - before,
        "cached_s": cached_s,
    }


def _phase_source(a: argparse.Namespace) -> dict[str, Any]:
    from dali_pipelines.sources import SampleSource, Shard, SourceSpec
    from equiav.config import AugmentConfig
    from equiav.data.index import read_dataset, read_label_csv

    table = read_dataset(a.list)
    spec = SourceSpec(
        table, read_label_csv(a.labels), a.batch_size, Shard(), "pretrain", augment=AugmentConfig()
    )
    before = _status_mib()["VmRSS"]
    t = time.perf_counter()
    source = SampleSource(spec)
    len(source)  # the first epoch's order
    seconds = time.perf_counter() - t
    added = _status_mib()["VmRSS"] - before
    t = time.perf_counter()
    blob = pickle.dumps(source, protocol=pickle.HIGHEST_PROTOCOL)
    pickle_s = time.perf_counter() - t
    t = time.perf_counter()
    pickle.loads(blob)
    unpickle_s = time.perf_counter() - t
    return {
        "entries": len(table),
        "seconds": seconds,
        "added_mib": added,
        "pickle_mib": len(blob) / 2**20,
        "pickle_s": pickle_s,
        "unpickle_s": unpickle_s,
    }


def _phase_loader(a: argparse.Namespace) -> dict[str, Any]:
    from dali_pipelines.loader import DaliLoader, LoaderConfig
    from equiav.config import AugmentConfig
    from equiav.data.index import read_dataset, read_label_csv

    t = time.perf_counter()
    table = read_dataset(a.list)
    cfg = LoaderConfig(
        batch_size=a.batch_size,
        mode="pretrain",
        num_threads=1,
        py_workers=a.py_workers,
        augment=AugmentConfig(),
        image_size=112,
        target_frames=256,
        frames_per_clip=max(1, min(10, int(a.seconds))),  # frame k at k + 0.5 s
    )
    loader = DaliLoader(table, read_label_csv(a.labels), cfg)
    next(iter(loader))
    seconds = time.perf_counter() - t
    # The children: DALI's source workers and multiprocessing's resource tracker.
    children = [_memory_mib(pid) for pid in _children(os.getpid())]
    own = _memory_mib()
    return {
        "entries": len(table),
        "seconds": seconds,
        "py_workers": a.py_workers,
        "process_rss_mib": own["Rss"],
        "process_anon_mib": own["Anonymous"],
        "children": len(children),
        "children_anon_mib": sum(c["Anonymous"] for c in children),
        "rank_pss_mib": own["Pss"] + sum(c["Pss"] for c in children),
    }


def _phase_check(a: argparse.Namespace) -> dict[str, Any]:
    from equiav.data.check import check_dataset

    seconds = {}
    # Cold (the list is new: no cache), then from the cache it wrote (every media file stat-ed
    # again: rank 0), then trusting the cache (the other ranks).
    for kind in ("cold", "cached", "trusted"):
        t = time.perf_counter()
        report = check_dataset(
            a.list, a.labels, trust_cache=kind == "trusted", progress=False, seconds=a.seconds
        )
        seconds[kind] = time.perf_counter() - t
        if kind != "cold" and report.from_cache_count != len(report.entries):
            raise RuntimeError(f"the {kind} check did not take the cache")
    return {
        "entries": len(report.entries),
        **{f"{kind}_s": v for kind, v in seconds.items()},
        "usable": len(report.usable),
        "workers": os.cpu_count(),
    }


def _emit(row: dict[str, Any]) -> None:
    print("STARTUP-ROW " + json.dumps(row), flush=True)


def _run_phase(phase: str, list_path: Path, labels: Path, a: argparse.Namespace) -> dict[str, Any]:
    """One phase in a fresh interpreter; its row from the line it prints."""
    cmd = [
        sys.executable,
        "-m",
        "bench.startup",
        "--phase",
        phase,
        "--list",
        str(list_path),
        "--labels",
        str(labels),
        "--batch-size",
        str(a.batch_size),
        "--py-workers",
        str(a.py_workers),
        "--seconds",
        str(a.seconds),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    rows = [line for line in done.stdout.splitlines() if line.startswith("STARTUP-ROW ")]
    if done.returncode != 0 or not rows:
        tail = (done.stderr or done.stdout)[-2000:]
        raise RuntimeError(f"phase {phase} failed (exit {done.returncode}):\n{tail}")
    return {"phase": phase, **json.loads(rows[-1].split(" ", 1)[1])}


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--entries", type=int, default=2_000_000, help="list length (AudioSet-2M)")
    p.add_argument(
        "--check-entries",
        type=int,
        default=100_000,
        help="list length of `check` (and a fifth of it: both above the checker's chunk of "
        "4096 entries, so that both go through its worker pool)",
    )
    p.add_argument("--py-workers", type=int, default=2, help="DALI source worker processes")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data", default="runs/bench-data", help="synthetic dataset folder")
    p.add_argument("--clips", type=int, default=60, help="clips to generate if --data is empty")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length of --data")
    p.add_argument("--classes", type=int, default=527, help="label classes (AudioSet: 527)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"a subset of {','.join(PHASES)}")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per phase")
    p.add_argument("--smoke", action="store_true", help="2000 entries, 200 checked")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--name", default=None, help="result name (default startup, startup-smoke)")
    p.add_argument("--quiet", action="store_true")
    # One phase in this process (used by the runner).
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--list", help=argparse.SUPPRESS)
    p.add_argument("--labels", help=argparse.SUPPRESS)
    return p


def _commit() -> str | None:
    """The code measured: the commit of this file's checkout, "+dirty" with local changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (head + ("+dirty" if dirty else "")) or None


def summarize(rows: Sequence[dict[str, Any]], gpus_per_node: int) -> dict[str, Any]:
    """Per-node host memory for the list, a rank's start-up, and the checker's cost at the
    list's length: from the two check sizes, a cost per entry (the slope, which leaves out the
    worker pool's start and the cache file) extrapolated linearly. Parts whose phases did not
    run are left out."""
    summary: dict[str, Any] = {"device": "cpu", "gpus_per_node": gpus_per_node}
    n = max((r["entries"] for r in rows if r["phase"] != "check"), default=None)
    summary["entries"] = n
    loader = next((r for r in rows if r["phase"] == "loader"), None)
    if loader is not None:
        summary["rank_pss_mib"] = loader["rank_pss_mib"]
        summary["node_gib"] = gpus_per_node * loader["rank_pss_mib"] / 1024
        summary["first_batch_s"] = loader["seconds"]
    checks = sorted((r for r in rows if r["phase"] == "check"), key=lambda r: r["entries"])
    if len(checks) == 2 and n is not None:
        small, big = checks
        for kind in ("cold", "cached", "trusted"):
            slope = (big[f"{kind}_s"] - small[f"{kind}_s"]) / (big["entries"] - small["entries"])
            # Timing noise can make it negative where both sizes take milliseconds (the smoke
            # run's 40 and 200 entries, a cached check); a cost per entry is not.
            slope = max(slope, 0.0)
            summary[f"check_{kind}_us_per_entry"] = 1e6 * slope
            summary[f"check_{kind}_s_at_entries"] = big[f"{kind}_s"] + slope * (n - big["entries"])
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.phase:
        handler = {
            "read": _phase_read,
            "source": _phase_source,
            "loader": _phase_loader,
            "check": _phase_check,
        }[a.phase]
        _emit(handler(a))
        # The loader phase leaves DALI's source workers and threads running: stop the workers
        # (an orphan would keep the runner's pipe open) and end without waiting for the rest.
        for pid in _children(os.getpid()):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        os._exit(0)
    from bench.end_to_end import dataset_paths, ensure_dataset

    if a.smoke:
        a.entries, a.check_entries = 2000, 200
    phases = a.phases.split(",")
    if unknown := set(phases) - set(PHASES):
        raise SystemExit(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    data = Path(a.data)
    ensure_dataset(data, a.clips, a.seconds, quiet=a.quiet, layouts=("webm",))
    pool = dataset_paths(data, "webm")[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        sizes = {"list": a.entries, "check-small": a.check_entries // 5, "check": a.check_entries}
        lists = {name: Path(tmp) / f"{name}.json" for name in sizes}  # each its own check cache
        labels = {name: write_list(pool, lists[name], n, a.classes) for name, n in sizes.items()}
        runs = [(p, "list") for p in PHASES if p != "check"] + [("check", "check-small")]
        runs = [r for r in [*runs, ("check", "check")] if r[0] in phases]
        for phase, name in runs:
            row = _run_phase(phase, lists[name], labels[name], a)
            rows.append(row)
            if not a.quiet:
                print(json.dumps(row), flush=True)
    summary = summarize(rows, a.gpus_per_node)
    config = {
        "entries": a.entries,
        "check_entries": a.check_entries,
        "py_workers": a.py_workers,
        "classes": a.classes,
        "phases": phases,
        "commit": _commit(),
        "batch_size": a.batch_size,
        "clip_seconds": a.seconds,
        "media": f"{pool} (webm layout; every entry one of its clips)",
        "smoke": a.smoke,
    }
    name = a.name or ("startup-smoke" if a.smoke else "startup")
    path = write_result(name, {"config": config, "rows": rows, "summary": summary}, a.results_dir)
    if not a.quiet:
        print(json.dumps(summary, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
