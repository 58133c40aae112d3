"""The end-to-end and scaling benchmarks in their CPU smoke modes, the step timer they share, the
capacity model's arithmetic against hand-computed numbers, and the report rendering both kinds.

The smoke runs use the real pieces: the DALI loader and the paper-style loader on the small
synthetic dataset, the trainer's step, and for scaling real torchrun launches of one and two gloo
processes, each with its own pipeline on its own shard under DDP.
"""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import statistics
import time

import matplotlib.image
import pytest
import torch

from bench import end_to_end, report, scaling
from bench.common import read_result, write_result


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A folder that the smoke runs of this module write their results into."""
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def e2e_result(synth_small, results):
    """The smoke run with --compile, dynamo's graphs handed to a backend that runs them as they
    are (inductor would take minutes on this CPU; what is checked is when dynamo compiles), the
    DALI-fed steps timed on both step streams (on a CPU both are the current stream), and the
    loader-fed runs again pinned to one CPU."""
    args = ["--data", str(synth_small.root), "--seconds", "4", "--smoke", "--cores", "1"]
    args += ["--step-stream", "default,high-priority", "--pin-cores"]
    compile_ = torch.compile

    def run_graph(gm, example_inputs):
        return gm.forward

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", lambda m, mode=None: compile_(m, backend=run_graph))
        assert end_to_end.main([*args, "--compile", "--results-dir", str(results)]) == 0
    return read_result(results / f"end_to_end-smoke-{socket.gethostname()}.json")


@pytest.fixture(scope="module")
def scaling_result(synth_small, results):
    args = [
        "--data",
        str(synth_small.root),
        "--seconds",
        "4",
        "--smoke",
        "--procs",
        "1,2",
        "--timeout",
        "150",
    ]
    assert scaling.main([*args, "--device", "cpu", "--results-dir", str(results)]) == 0
    return read_result(results / f"scaling-smoke-{socket.gethostname()}.json")


def test_time_steps_splits_waiting_from_computing():
    # A loader that takes 40 ms per batch and a step that takes 40 ms: half the time is waiting.
    def next_batch():
        time.sleep(0.04)
        return {"labels": torch.zeros(3)}

    timing = end_to_end.time_steps(
        lambda batch: time.sleep(0.04), next_batch, 4, 1, torch.device("cpu")
    )
    assert timing["samples"] == 12
    assert timing["data_wait_frac"] == pytest.approx(0.5, abs=0.1)
    assert timing["step_ms"] == pytest.approx(80, rel=0.3)
    assert timing["samples_per_s"] == pytest.approx(timing["samples"] / timing["seconds"], 1e-3)
    with pytest.raises(ValueError, match="steps"):
        end_to_end.time_steps(lambda b: None, next_batch, 0, 1, torch.device("cpu"))


def test_whole_rounds_of_the_paper_style_workers_time_their_steady_rate():
    """A model of the paper-style DataLoader: W workers make whole batches side by side, so
    batch b is ready at (b // W + 1) rounds. Timed after 3 warm-up batches, 5 batches take 2
    rounds (25 % too fast), after 2 they take 3 (17 % too slow); whole rounds (6) take 3 after
    either, the steady rate."""
    from bench.common import whole_rounds

    assert [whole_rounds(n, 2) for n in (1, 5, 6, 20)] == [2, 6, 6, 20]
    assert whole_rounds(7, 4) == 8 and whole_rounds(5, 1) == 5 and whole_rounds(5, 0) == 5
    with pytest.raises(ValueError, match="batches must be >= 1"):
        whole_rounds(0, 2)

    workers, round_s, batch = 2, 0.1, 4
    steady = workers * batch / round_s

    def rate(steps: int, warmup: int) -> float:
        made = 0
        start = time.perf_counter()

        def next_batch():
            nonlocal made
            ready = start + (made // workers + 1) * round_s
            made += 1
            time.sleep(max(0.0, ready - time.perf_counter()))
            return {"labels": torch.zeros(batch)}

        timing = end_to_end.time_steps(
            lambda b: None, next_batch, steps, warmup, torch.device("cpu")
        )
        return timing["samples_per_s"]

    assert rate(5, 3) > 1.15 * steady  # 20 samples in 2 rounds: 1.25x
    assert rate(5, 2) < 0.9 * steady  # in 3 rounds: 0.83x
    for warmup in (2, 3):
        assert rate(whole_rounds(5, workers), warmup) == pytest.approx(steady, rel=0.08)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to pin to 1")
def test_pinning_holds_every_thread_and_what_they_start_then_lets_go():
    """Threads running before the block, threads and processes started in it: all on the
    chosen CPUs inside; every thread back to its own mask afterwards."""
    import subprocess
    import sys
    import threading

    from bench.common import pinned_to_cores

    everything = os.sched_getaffinity(0)
    first = min(everything)
    go, seen = threading.Event(), {}

    def waiter():  # started before the block, reads its mask inside it
        go.wait()
        seen["before"] = os.sched_getaffinity(0)

    old = threading.Thread(target=waiter)
    old.start()
    child = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    with pinned_to_cores(1) as cpus:
        assert cpus == [first] and os.sched_getaffinity(0) == {first}
        go.set()
        old.join()
        new = threading.Thread(target=lambda: seen.setdefault("new", os.sched_getaffinity(0)))
        new.start()
        new.join()
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
    assert seen == {"before": {first}, "new": {first}} and out.strip() == f"[{first}]"
    assert os.sched_getaffinity(0) == everything
    out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sorted(everything))
    with pytest.raises(ValueError, match="cannot pin to 0 cores"):
        with pinned_to_cores(0):
            pass


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux's /proc")
def test_cpu_meter_counts_threads_live_children_and_reaped_ones():
    """A thread's CPU, a live child's, and an exited child's (reaped: its time moves into ours)
    each count once; a window where the process sleeps counts ~nothing."""
    import subprocess
    import sys
    import threading

    from bench.common import cpu_fields, cpu_words, process_tree_cpu_seconds

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < {}: pass\n"

    def burn_thread(seconds: float) -> None:
        start = time.thread_time()
        while time.thread_time() - start < seconds:
            pass

    meter = process_tree_cpu_seconds
    before = meter()
    time.sleep(0.3)
    assert meter() - before < 0.1
    # a thread and a child that exits (reaped by wait) while the meter is not looking
    before = meter()
    worker = threading.Thread(target=burn_thread, args=(0.4,))
    worker.start()
    subprocess.run([sys.executable, "-c", burn.format(0.4)], check=True)
    worker.join()
    used = meter() - before
    assert 0.75 <= used <= 1.3  # 0.8 s burnt, plus the child's interpreter start-up
    # a child still running when the meter reads: counted live
    script = burn.format(0.4) + "print('done', flush=True)\nimport sys\nsys.stdin.read()\n"
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        before = meter()
        assert child.stdout.readline().strip() == "done"
        assert 0.35 <= meter() - before <= 0.8
        assert meter(child.pid) >= 0.4
    finally:
        child.kill()
        child.wait()
    with pytest.raises(ProcessLookupError):
        meter(child.pid)
    fields = cpu_fields(meter() - 2.0, 4.0, 8)  # at least 2 s of CPU over a 4 s window
    assert fields["cpu_s"] >= 2.0 and fields["cpu_cores_busy"] >= 0.5
    assert fields["cpu_ms_per_sample"] == pytest.approx(1e3 * fields["cpu_s"] / 8)
    assert cpu_fields(None, 4.0, 8) == dict.fromkeys(fields)
    # how a comparison (the run's log, the report's targets table) states them
    both = {"dali_cpu_cores_busy": 1.234, "baseline_cpu_cores_busy": 2.0}
    assert cpu_words(both) == "CPU used: 1.23 cores DALI-fed, 2.00 paper-style"
    assert cpu_words({**both, "baseline_cpu_cores_busy": None}) == "" == cpu_words({})


def test_a_failed_dali_fed_run_costs_only_its_own_row(synth_small, monkeypatch):
    """One step stream's DALI-fed run failing (out of memory, say) leaves an error row for it;
    step-only, the other stream's run and the paper-style loader are still measured and
    compared. Likewise the pinned runs failing as a whole."""
    import dali_pipelines.loader

    cpu = torch.device("cpu")
    batch = {"labels": torch.zeros(2)}
    built = []

    def build_loader(cfg, split, mode, device=None):
        built.append(mode)
        if len(built) == 2:  # the probe, then the first DALI-fed run's loader
            raise RuntimeError("CUDA out of memory (simulated)")
        return [batch] * 4

    monkeypatch.setattr(dali_pipelines.loader, "build_loader", build_loader)
    monkeypatch.setattr(end_to_end, "TrainStep", lambda setup, cfg, device: lambda b: None)
    monkeypatch.setattr(
        end_to_end,
        "_baseline_timing",
        lambda *args: end_to_end._fed_timing(lambda b: None, [batch] * 4, lambda b: b, 2, 1, cpu),
    )
    cfg = end_to_end.bench_config(
        synth_small.root, mode="pretrain", size="tiny", smoke=True, batch_size=2, threads=1,
        precision="fp32", seconds=4.0,
    )  # fmt: skip
    rows = end_to_end.measure_model(
        cfg, "pretrain", "tiny", cpu, 2, 1, "frames", log=lambda m: None,
        streams=["default", "high-priority"],
    )  # fmt: skip
    assert len(built) == 3  # the failure did not stop the next run
    assert [(r["pipeline"], r["step_stream"], r["status"]) for r in rows] == [
        ("step-only", "default", "ok"),
        ("dali-frames", "default", "error"),
        ("dali-frames", "high-priority", "ok"),
        ("baseline-frames", "default", "ok"),
    ]
    assert "CUDA out of memory (simulated)" in rows[1]["error"] and "samples" not in rows[1]
    (comparison,) = end_to_end.summarize(rows, cpu)["comparisons"]
    assert comparison["step_stream"] == "high-priority"
    assert comparison["dali_vs_baseline"] == pytest.approx(
        rows[2]["samples_per_s"] / rows[3]["samples_per_s"]
    )

    # The pinned runs failing (here: no CPUs to pin to) leave the unpinned rows standing.
    def no_pinning(cores):
        raise ValueError(f"cannot pin to {cores} cores (simulated)")

    monkeypatch.setattr(end_to_end, "pinned_to_cores", no_pinning)
    built.clear()
    rows = end_to_end.measure_model(
        cfg, "pretrain", "tiny", cpu, 2, 1, "frames", log=lambda m: None, pin=True
    )
    assert [(r["pipeline"], r["status"]) for r in rows] == [
        ("step-only", "ok"), ("dali-frames", "error"), ("baseline-frames", "ok"),
        ("pinned-runs", "error"),
    ]  # fmt: skip
    assert "cannot pin to 1 cores (simulated)" in rows[-1]["error"]


def test_a_failed_paper_style_run_costs_only_its_own_row(synth_small, monkeypatch):
    """The paper-style loader failing (a killed worker, say) leaves an error row for it, in the
    unpinned and in the pinned runs; step-only and the DALI-fed rows stand, with no comparison
    for the rows that lost their partner."""
    import dali_pipelines.loader

    cpu = torch.device("cpu")
    batch = {"labels": torch.zeros(2)}
    works = []

    def failing_baseline(step, cfg, mode, device, steps, warmup, work):
        works.append(work)
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Killed (simulated)")

    monkeypatch.setattr(dali_pipelines.loader, "build_loader", lambda *a, **k: [batch] * 4)
    monkeypatch.setattr(end_to_end, "TrainStep", lambda setup, cfg, device: lambda b: None)
    monkeypatch.setattr(end_to_end, "_baseline_timing", failing_baseline)

    @contextlib.contextmanager
    def pinned_to_cores(cores):
        yield [0]

    monkeypatch.setattr(end_to_end, "pinned_to_cores", pinned_to_cores)
    cfg = end_to_end.bench_config(
        synth_small.root, mode="pretrain", size="tiny", smoke=True, batch_size=2, threads=1,
        precision="fp32", seconds=4.0,
    )  # fmt: skip
    rows = end_to_end.measure_model(
        cfg, "pretrain", "tiny", cpu, 2, 1, "frames", log=lambda m: None, pin=True,
        baseline_work="lean",
    )  # fmt: skip
    assert works == ["lean", "lean"]
    assert [(r["pipeline"], r["pinned_cores"], r["status"]) for r in rows] == [
        ("step-only", None, "ok"), ("dali-frames", None, "ok"), ("baseline-frames", None, "error"),
        ("dali-frames", [0], "ok"), ("baseline-frames", [0], "error"),
    ]  # fmt: skip
    assert "killed by signal" in rows[2]["error"] and rows[2]["baseline_work"] == "lean"
    assert end_to_end.summarize(rows, cpu)["comparisons"] == []


def test_median_rows_match_rows_by_what_they_measured():
    """Rows of alternating rounds are matched by pipeline, step stream and pinning (not by
    place: a round may lack a row), each the median round's whole row, with every round's
    samples/s; a run failing in one round drops out of its median, in every round keeps its
    error row."""
    from bench.common import median_rows

    def row(pipeline, sps=None, stream="default", pinned=None, error=None):
        r = {"pipeline": pipeline, "step_stream": stream, "pinned_cores": pinned}
        if error:
            return {**r, "status": "error", "error": error}
        return {**r, "status": "ok", "samples_per_s": sps, "seconds": 100.0 / sps}

    rounds = [
        [row("dali", 10.0), row("dali", 30.0, "high"), row("base", 4.0), row("pinned", error="x")],
        [row("base", 5.0), row("dali", 12.0), row("dali", error="oom", stream="high")],
        [row("dali", 11.0), row("dali", 20.0, "high"), row("base", 3.0),
         row("dali", 9.0, pinned=[0])],
    ]  # fmt: skip
    merged = {
        (r["pipeline"], r["step_stream"], bool(r["pinned_cores"])): r for r in median_rows(rounds)
    }
    assert list(merged) == [
        ("dali", "default", False), ("dali", "high", False), ("base", "default", False),
        ("pinned", "default", False), ("dali", "default", True),
    ]  # fmt: skip
    dali = merged[("dali", "default", False)]
    assert dali["samples_per_s"] == 11.0 and dali["seconds"] == 100.0 / 11.0  # one round's row
    assert dali["round_samples_per_s"] == [10.0, 12.0, 11.0]
    high = merged[("dali", "high", False)]  # 20 and 30 measured: the lower middle one
    assert high["samples_per_s"] == 20.0 and high["round_samples_per_s"] == [30.0, None, 20.0]
    assert merged[("base", "default", False)]["samples_per_s"] == 4.0
    assert merged[("pinned", "default", False)]["error"] == "x"
    assert merged[("dali", "default", True)]["round_samples_per_s"] == [None, None, 9.0]


def test_repeated_rounds_give_median_rows_and_each_rounds_ratio(monkeypatch):
    """--repeats: the loader-fed runs (pinned ones included) in alternating rounds, step-only
    once; each row the median round's, each DALI-fed row's ratio to the paper-style run of the
    same round and pinning, and the comparison's ratio the median of the rounds' ratios (the
    two loaders' median rows come from different rounds here)."""
    speeds = iter([(40.0, 10.0), (60.0, 10.0), (50.0, 20.0)])  # (DALI, paper-style) per round
    calls = []

    def loader_fed_rows(step, cfg, mode, device, steps, warmup, streams, base, pinned, work):
        calls.append(pinned)
        dali, paper = next(speeds) if pinned is None else (8.0, 4.0)
        ok = {**base, "status": "ok", "pinned_cores": pinned, "step_stream": "default"}
        timing = {"data_wait_frac": 0.1, "graphs_compiled_timed": 0}
        return [
            {**ok, **timing, "pipeline": "dali-frames", "samples_per_s": dali},
            {**ok, **timing, "pipeline": "baseline-frames", "samples_per_s": paper},
        ]

    @contextlib.contextmanager
    def pinned_to_cores(cores):
        yield [0]

    monkeypatch.setattr(end_to_end, "_loader_fed_rows", loader_fed_rows)
    monkeypatch.setattr(end_to_end, "pinned_to_cores", pinned_to_cores)
    monkeypatch.setattr(end_to_end, "_probe_batch", lambda cfg, mode, device: {})
    monkeypatch.setattr(end_to_end, "TrainStep", lambda setup, cfg, device: lambda b: None)
    monkeypatch.setattr(
        end_to_end,
        "time_steps",
        lambda *args: {"samples_per_s": 100.0, "data_wait_frac": 0.0, "graphs_compiled_timed": 0},
    )
    cfg = end_to_end.default_config("pretrain")
    cpu = torch.device("cpu")
    rows = end_to_end.measure_model(
        cfg, "pretrain", "tiny", cpu, 2, 1, "frames", log=lambda m: None, pin=True, repeats=3
    )
    assert calls == [None, [0]] * 3  # alternating: unpinned then pinned, round after round
    assert [(r["pipeline"], r["pinned_cores"]) for r in rows] == [
        ("step-only", None), ("dali-frames", None), ("baseline-frames", None),
        ("dali-frames", [0]), ("baseline-frames", [0]),
    ]  # fmt: skip
    dali, base = rows[1], rows[2]
    assert dali["round_samples_per_s"] == [40.0, 60.0, 50.0] and dali["samples_per_s"] == 50.0
    assert base["round_samples_per_s"] == [10.0, 10.0, 20.0] and base["samples_per_s"] == 10.0
    assert (
        dali["round_vs_baseline"] == [4.0, 6.0, 2.5] and rows[3]["round_vs_baseline"] == [2.0] * 3
    )
    assert dali["vs_step_only"] == 0.5
    unpinned, pinned = end_to_end.summarize(rows, cpu)["comparisons"]
    assert unpinned["dali_vs_baseline"] == 4.0  # not 5.0, the median rows' (rounds 3 and 1)
    assert unpinned["dali_vs_baseline_rounds"] == [4.0, 6.0, 2.5]
    assert pinned["dali_vs_baseline"] == 2.0 and pinned["pinned_cores"] == [0]
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        end_to_end.measure_model(cfg, "pretrain", "tiny", cpu, 2, 1, "frames", repeats=0)

    # Pinned runs only (a GPU session short of time): they answer both targets.
    calls.clear()
    rows = end_to_end.measure_model(
        cfg, "pretrain", "tiny", cpu, 2, 1, "frames", log=lambda m: None, pin=True,
        unpinned=False,
    )  # fmt: skip
    assert calls == [[0]]
    assert [(r["pipeline"], r["pinned_cores"]) for r in rows] == [
        ("step-only", None), ("dali-frames", [0]), ("baseline-frames", [0]),
    ]  # fmt: skip
    (pinned,) = end_to_end.summarize(rows, cpu)["comparisons"]
    assert pinned["dali_vs_baseline"] == 2.0
    with pytest.raises(ValueError, match="nothing to time"):
        end_to_end.measure_model(cfg, "pretrain", "tiny", cpu, 2, 1, "frames", unpinned=False)


def test_ensure_dataset_renders_only_the_layouts_asked_for(tmp_path):
    end_to_end.ensure_dataset(tmp_path, clips=4, seconds=2.0, quiet=True, layouts=("frames",))
    assert (tmp_path / "train.json").exists() and not (tmp_path / "train_webm.json").exists()
    assert not list(tmp_path.rglob("*.webm")) and list(tmp_path.rglob("*.jpg"))
    stamp = (tmp_path / "train.json").stat().st_mtime_ns
    end_to_end.ensure_dataset(tmp_path, clips=4, seconds=2.0, quiet=True, layouts=("frames",))
    assert (tmp_path / "train.json").stat().st_mtime_ns == stamp  # there already: kept


def test_epoch_starts_inside_the_timed_steps():
    # The GPU stages' windows on the 481-clip set (433 training clips): pretraining at batch
    # 16 has 27 batches an epoch, finetuning at 32 has 13; 3 warmup + 40 timed steps.
    assert end_to_end.epoch_starts(27, 40, 3) == 1  # batch 27
    assert end_to_end.epoch_starts(13, 40, 3) == 3  # batches 13, 26, 39
    assert end_to_end.epoch_starts(5, 10, 5) == 2  # batches 5 and 10: the window's first counts
    assert end_to_end.epoch_starts(4, 2, 0) == 1  # no warmup: the loader's first start
    assert end_to_end.epoch_starts(100, 40, 3) == 0
    with pytest.raises(ValueError, match="batches an epoch"):
        end_to_end.epoch_starts(0, 4, 1)


def test_end_to_end_smoke_writes_a_valid_result(e2e_result):
    assert e2e_result["benchmark"] == "end_to_end-smoke"
    assert e2e_result["summary"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    all_rows = e2e_result["rows"]
    cpu = [min(os.sched_getaffinity(0))]  # --cores 1: the first CPU
    pipelines = [(r["pipeline"], r["step_stream"], r["pinned_cores"]) for r in all_rows]
    assert pipelines == [
        ("step-only", "default", None),
        ("dali-frames", "default", None),
        ("dali-frames", "high-priority", None),
        ("baseline-frames", "default", None),
        ("dali-frames", "default", cpu),  # --pin-cores: the loader-fed runs again, pinned
        ("dali-frames", "high-priority", cpu),
        ("baseline-frames", "default", cpu),
    ]
    config = e2e_result["config"]
    assert config["step_streams"] == ["default", "high-priority"] and config["pin_cores"]
    # The paper-style loader as the original's code runs, its unused work included (default).
    assert config["baseline_work"] == "paper"
    assert {r.get("baseline_work") for r in all_rows if r["pipeline"] == "baseline-frames"} == {
        "paper"
    }
    assert config["runs"]["tiny/pretrain"] == {"batch_size": 2, "steps": 2, "warmup_steps": 1}
    rows = {r["pipeline"]: r for r in all_rows[:4] if r["step_stream"] == "default"}
    step_only = rows["step-only"]["samples_per_s"]
    for row in all_rows:
        # a stream of its own only on a GPU, where it is the device's highest priority
        cuda_prio = torch.cuda.is_available() and row["step_stream"] == "high-priority"
        assert (row["step_stream_priority"] is not None) == cuda_prio
        assert row["status"] == "ok" and row["mode"] == "pretrain" and row["model"] == "tiny"
        assert row["samples"] == 2 * 2  # batch 2, 2 timed steps
        assert row["samples_per_s"] == pytest.approx(row["samples"] / row["seconds"])
        assert 0.0 <= row["data_wait_frac"] <= 1.0
        assert row["data_wait_ms"] <= row["step_ms"]
        assert row["step_only_samples_per_s"] == step_only
        assert row["vs_step_only"] == pytest.approx(row["samples_per_s"] / step_only)
        # what "auto" ran: torch's on a CPU, the tf32x3 kernel for 2 clips on a GPU
        assert row["fbank_ran"] == ("triton-tf32x3" if torch.cuda.is_available() else "torch")
        if row["pipeline"] != "step-only":
            # 8 training clips in batches of 2: 4 an epoch, the 2 timed steps are batches 1, 2.
            # The step-only loop has nothing to wait for; the loaders do real work.
            assert row["epoch_starts"] == 0 and row["data_wait_ms"] > 0.0
    assert rows["step-only"]["data_wait_frac"] < 0.01
    assert all(r["data_wait_ms"] > 1.0 for r in all_rows if r["pipeline"] == "dali-frames")
    # One comparison per DALI-fed row, against the paper-style run with the same pinning.
    comparisons = e2e_result["summary"]["comparisons"]
    dalis = [r for r in all_rows if r["pipeline"] == "dali-frames"]
    assert len(comparisons) == len(dalis) == 4
    for c, dali in zip(comparisons, dalis, strict=True):
        base = next(
            r
            for r in all_rows
            if r["pipeline"] == "baseline-frames" and r["pinned_cores"] == dali["pinned_cores"]
        )
        assert (c["step_stream"], c["pinned_cores"]) == (dali["step_stream"], dali["pinned_cores"])
        assert c["dali_vs_baseline"] == pytest.approx(dali["samples_per_s"] / base["samples_per_s"])
        assert c["dali_data_wait_frac"] == dali["data_wait_frac"]
        assert c["dali_vs_step_only"] == dali["vs_step_only"]
        assert c["baseline_data_wait_frac"] == base["data_wait_frac"]
        assert c["dali_cpu_cores_busy"] == dali["cpu_cores_busy"]
        assert c["baseline_cpu_cores_busy"] == base["cpu_cores_busy"]
        assert c["baseline_work"] == "paper"
    # The CPU each run used, its worker processes and threads included: some for every
    # loader-fed run, and at most the one CPU that the pinned runs were pinned to (10 ms ticks
    # per process counted in: a few per run).
    for row in all_rows:
        assert row["cpu_s"] > 0 and row["cpu_ms_per_sample"] == pytest.approx(
            1e3 * row["cpu_s"] / row["samples"]
        )
        assert row["cpu_cores_busy"] == pytest.approx(row["cpu_s"] / row["seconds"])
        if row["pinned_cores"]:
            assert row["cpu_s"] <= row["seconds"] + 0.05
    # Compiled once, on the step-only batch: the loaders' batches (DALI's outputs, the
    # paper-style loader's copied to the device) pass the same guards, so no loader-fed
    # warmup stalls on a compilation, and nothing compiles inside a timed window.
    assert rows["step-only"]["compile"] and rows["step-only"]["graphs_compiled_warmup"] >= 1
    assert all(r["graphs_compiled_warmup"] == 0 for r in all_rows[1:])
    assert all(row["graphs_compiled_timed"] == 0 for row in all_rows)


def test_scaling_smoke_runs_one_and_two_gloo_processes(scaling_result):
    rows = scaling_result["rows"]
    assert [r["gpus"] for r in rows] == [1, 2]
    for row in rows:
        k = row["processes"]
        assert row["status"] == "ok" and row["backend"] == "gloo" and row["device"] == "cpu"
        # Every rank trains on as many samples, so the global rate is k x the slowest rank's.
        assert row["samples_per_s"] == pytest.approx(k * row["per_process_samples_per_s_min"])
        assert row["per_process_samples_per_s_min"] <= row["per_process_samples_per_s"]
        assert 0.0 <= row["data_wait_frac"] <= row["data_wait_frac_max"] <= 1.0
        assert row["pipeline_samples_per_s_per_process"] > 0
        assert row["pipeline_samples_per_s_per_thread"] == pytest.approx(
            row["pipeline_samples_per_s_per_process"] / row["threads_per_process"]
        )
        # Each process read its own shard, and DDP kept the two replicas identical.
        assert row["shards_disjoint"] is True and row["replicas_in_sync"] is True
    assert rows[0]["scaling_efficiency"] == 1.0
    assert rows[1]["scaling_efficiency"] == pytest.approx(
        rows[1]["samples_per_s"] / (2 * rows[0]["samples_per_s"])
    )
    capacity = scaling_result["summary"]["capacity"]
    assert capacity["per_gpu_samples_per_s"] == scaling.ESTIMATED_PER_GPU_SAMPLES_PER_S
    assert capacity["per_node"]["dali_samples_per_s_per_core"] == pytest.approx(
        rows[0]["pipeline_samples_per_s_per_thread"]
    )


def test_capacity_model_arithmetic():
    c = scaling.capacity_model(
        500.0,
        {"small": 100_000, "large": 250_000},
        param_count=100_000_000,
        dali_samples_per_s_per_core=50.0,
        batch_per_gpu=16,
        gpus_per_node=8,
        cores_per_node=16,
        nodes=(1, 2, 4),
        overlap_fraction=0.5,
    )
    node = c["per_node"]
    assert node["samples_per_s"] == 4000  # 8 x 500
    assert node["storage_read_mb_per_s"] == pytest.approx({"small": 400.0, "large": 1000.0})
    assert node["dali_cores_per_gpu"] == pytest.approx(10.0)  # 500 / 50
    assert node["dali_cores_needed"] == pytest.approx(80.0)
    assert node["cores_suffice"] is False
    assert c["step_time_s"] == pytest.approx(0.032)  # 16 / 500
    ar = c["allreduce"]
    assert ar["window_s"] == pytest.approx(0.016)
    assert ar["grad_bytes"] == {"bf16": 2e8, "fp32": 4e8}
    # Ring over 8 GPUs: 2 x 7/8 x 2e8 bytes in 16 ms = 21.875 GB/s per GPU (bf16).
    assert ar["intra_node_gb_per_s_per_gpu"] == pytest.approx({"bf16": 21.875, "fp32": 43.75})
    by_nodes = {r["nodes"]: r for r in c["nodes"]}
    assert by_nodes[1]["inter_node_gb_per_s_per_node"] == {"bf16": 0.0, "fp32": 0.0}
    # 2 nodes: 2 x 1/2 x 2e8 / 0.016 s = 12.5 GB/s per node = 100 Gbit/s over 8 NICs.
    assert by_nodes[2]["inter_node_gb_per_s_per_node"] == pytest.approx({"bf16": 12.5, "fp32": 25})
    assert by_nodes[2]["inter_node_gbit_per_s_per_nic"] == pytest.approx({"bf16": 12.5, "fp32": 25})
    # 4 nodes: 2 x 3/4 x 2e8 / 0.016 s = 18.75 GB/s per node.
    assert by_nodes[4]["inter_node_gb_per_s_per_node"]["bf16"] == pytest.approx(18.75)
    assert by_nodes[4]["gpus"] == 32 and by_nodes[4]["samples_per_s"] == 16000
    assert by_nodes[4]["storage_read_mb_per_s"]["large"] == pytest.approx(4000.0)

    plain = scaling.capacity_model(100.0, 1e6, param_count=10, dali_samples_per_s_per_core=None)
    assert plain["per_node"]["storage_read_mb_per_s"] == {"measured": pytest.approx(800.0)}
    assert plain["per_node"]["dali_cores_needed"] is None and plain["per_node"]["host_gib"] is None
    held = scaling.capacity_model(100.0, 1e6, param_count=10, host_mib_per_gpu=2048.0)
    assert held["per_node"]["host_gib"] == pytest.approx(16.0)  # 8 x 2 GiB
    for bad in ({"per_gpu_samples_per_s": 0.0}, {"overlap_fraction": 0.0}, {"nodes": (0,)}):
        kwargs = {"per_gpu_samples_per_s": 1.0, "bytes_per_sample": 1.0, "param_count": 1}
        with pytest.raises(ValueError):
            scaling.capacity_model(**{**kwargs, **bad})


def test_capacity_inputs_count_the_model_and_the_media(synth_small):
    from equiav.config import default_config
    from equiav.model import EquiAVPretrain

    cfg = default_config("pretrain")
    with torch.device("meta"):
        model = EquiAVPretrain(cfg.model, cfg.data)
    count = scaling.pretrain_param_count()
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 2 * 85_000_000 < count < 230_000_000  # two ViT-B towers and the small parts

    root = synth_small.root
    ids = [os.path.basename(p)[:-4] for p in glob.glob(str(root / "wav" / "*.wav"))]
    train = [i for i in ids if i in (root / "train.json").read_text()]
    wav = statistics.fmean(os.path.getsize(root / "wav" / f"{i}.wav") for i in train)
    jpegs = [p for i in train for p in glob.glob(str(root / "frames" / "frame_*" / f"{i}.jpg"))]
    frame = statistics.fmean(os.path.getsize(p) for p in jpegs)
    measured = scaling.media_bytes_per_sample(root / "train.json")
    assert measured == pytest.approx(wav + 2 * frame)
    videos = glob.glob(str(root / "video" / "*.webm"))
    video = statistics.fmean(
        os.path.getsize(p) for p in videos if os.path.basename(p)[:-5] in train
    )
    assert scaling.media_bytes_per_sample(root / "train_webm.json") == pytest.approx(
        wav + 2 * video
    )


def test_report_renders_end_to_end_and_scaling(e2e_result, scaling_result, results, tmp_path):
    host = socket.gethostname()
    demo = {
        "config": {},
        "rows": [{"gpus": 1, "samples_per_s": 10.0}, {"gpus": 2, "samples_per_s": 19.0}],
        "summary": {
            "capacity": scaling.capacity_model(
                500.0, {"small": 100_000}, param_count=100_000_000,
                dali_samples_per_s_per_core=50.0, nodes=(1, 2), overlap_fraction=0.5,
                host_mib_per_gpu=1536.0,
            ),
            "note": "hand-made",
        },
    }  # fmt: skip
    write_result("scaling-demo", demo, results)
    out = tmp_path / "out"
    text = report.write_report(results, out).read_text()
    assert "## End to end vs step only (`end_to_end-*`)" in text
    assert "## Scaling (`scaling-*`)" in text
    for stem in (f"end_to_end-smoke-{host}", f"scaling-smoke-{host}", f"scaling-demo-{host}"):
        assert f"(plots/{stem}.png)" in text
        assert matplotlib.image.imread(out / "plots" / f"{stem}.png").shape[0] > 100
    # The hand-made capacity model, rendered as tables (numbers from the arithmetic test).
    demo_part = text.split(f"### `scaling-demo-{host}.json`")[1].split("### ")[0]
    assert "| samples/s | 4000 |" in demo_part
    assert "| storage reads, small (100 kB/sample) | 400 MB/s |" in demo_part
    assert "| CPU cores for the DALI pipeline (at 50 samples/s per core) | 80.0 " in demo_part
    assert "of 16: too few |" in demo_part
    assert "| NVLink per GPU to hide it, bf16 / fp32 | 21.9 / 43.8 GB/s |" in demo_part
    assert "source workers | 12.0 GiB (1536 MiB per GPU) |" in demo_part
    assert "| 2 | 16 | 8000 | 800 | 12.5 / 25 | 12.5 / 25 |" in demo_part
    assert '"note": "hand-made"' in demo_part and '"capacity"' not in demo_part
    smoke_part = text.split(f"### `scaling-smoke-{host}.json`")[1].split("### ")[0]
    assert "**Capacity model**" in smoke_part and "| 8 | 64 | 38400 |" in smoke_part
    e2e_part = text.split(f"### `end_to_end-smoke-{host}.json`")[1].split("### ")[0]
    assert "| pretrain | tiny | frames |" in e2e_part and "dali-frames" in e2e_part
    assert "high-priority" in e2e_part  # the step-stream column


def test_bench_config_carries_source_workers_compile_optimizer_gelu_and_qkv(synth_small):
    """--py-workers, --compile, --unfused, --gelu, --qkv, --hw-decoder-load and --fbank-backend
    reach the trainer's config (data.py_workers, train.compile, optim.fused, model.gelu,
    model.qkv, data.hw_decoder_load, data.fbank_backend), and the step built from it runs that
    model."""
    from bench.step import StepSetup, TrainStep
    from equiav.model.vit import SplitQKVAttention
    from kernels.gelu import GELU

    common = dict(mode="pretrain", size="tiny", smoke=True, batch_size=2, threads=1)
    cfg = end_to_end.bench_config(synth_small.root, **common, precision="fp32", seconds=4.0)
    assert cfg.data.py_workers == 0 and not cfg.train.compile
    assert cfg.optim.fused and cfg.model.gelu == "torch" and cfg.model.qkv == "packed"
    assert cfg.data.hw_decoder_load == 0.65 and cfg.data.fbank_backend == "auto"  # defaults
    cfg = end_to_end.bench_config(
        synth_small.root,
        **common,
        precision="fp32",
        seconds=4.0,
        py_workers=2,
        compile=True,
        fused=False,
        gelu="triton",
        qkv="split",
        hw_decoder_load=1.0,
        fbank_backend="triton-tf32x3",
    )
    assert cfg.data.fbank_backend == "triton-tf32x3"
    assert cfg.data.py_workers == 2 and cfg.train.compile and cfg.data.hw_decoder_load == 1.0
    assert not cfg.optim.fused and cfg.model.gelu == "triton" and cfg.model.qkv == "split"
    step = TrainStep(StepSetup.of("pretrain", cfg), cfg, torch.device("cpu"))
    assert any(isinstance(m, GELU) for m in step.model.modules())
    assert any(isinstance(m, SplitQKVAttention) for m in step.model.modules())


def test_capacity_inputs_come_from_gpu_results(tmp_path):
    """The capacity model's step rate is the best GPU pretraining step at the paper batch (a
    bench.step row or an end-to-end step-only row), and its CPU cost per sample is the best GPU
    loader row with the source inline (per DALI thread); CPU results and other rows are
    ignored."""
    gpu, cpu = {"device": "cuda"}, {"device": "cpu"}
    step = {"mode": "pretrain", "status": "ok", "batch_kind": "paper"}
    e2e = {"mode": "pretrain", "status": "ok", "model": "full", "batch_size": 16}
    frames = {"layout": "frames", "storage": "files", "threads": 2, "py_workers": 0}

    def result(name, summary, *rows):
        write_result(name, {"config": {}, "rows": list(rows), "summary": summary}, tmp_path)

    assert scaling.gpu_step_rate(tmp_path) is None and scaling.gpu_loader_rate(tmp_path) is None
    result("step-a", gpu, {**step, "samples_per_s": 250.0}, {**step, "batch_kind": "largest",
           "samples_per_s": 900.0})  # fmt: skip
    result("step-cpu", cpu, {**step, "samples_per_s": 5000.0})
    assert scaling.gpu_step_rate(tmp_path)[0] == 250.0
    result("end_to_end-b", gpu, {**e2e, "pipeline": "step-only", "samples_per_s": 430.0},
           {**e2e, "pipeline": "dali-frames", "samples_per_s": 600.0},
           {**e2e, "pipeline": "step-only", "batch_size": 64, "samples_per_s": 700.0})  # fmt: skip
    rate, source = scaling.gpu_step_rate(tmp_path)
    assert rate == 430.0 and "end_to_end-b" in source and "step-only" in source
    result("loader-c", gpu, {**frames, "pipeline": "dali-frames", "samples_per_s": 1800.0},
           {**frames, "pipeline": "dali-frames-pyw2", "py_workers": 2, "samples_per_s": 3000.0},
           {**frames, "pipeline": "dali-webm", "layout": "webm", "samples_per_s": 2500.0},
           {"pipeline": "baseline-frames", "layout": "frames", "samples_per_s": 40.0})  # fmt: skip
    result("loader-cpu", cpu, {**frames, "pipeline": "dali-frames", "samples_per_s": 9000.0})
    rate, source = scaling.gpu_loader_rate(tmp_path)
    assert rate == 900.0 and "loader-c" in source and "2 threads" in source
    # The CPU a GPU's training process used, where end-to-end rows measured it: the DALI-fed
    # full-size pretraining row that needed the least CPU per sample.
    assert scaling.gpu_training_cpu_rate(tmp_path) is None  # end_to_end-b has no CPU fields
    fed = {**e2e, "pipeline": "dali-frames", "samples_per_s": 500.0, "batch_size": 256}
    result("end_to_end-d", gpu, {**fed, "cpu_ms_per_sample": 4.0},
           {**fed, "cpu_ms_per_sample": 2.5, "pinned_cores": [0, 1]},
           {**fed, "pipeline": "baseline-frames", "cpu_ms_per_sample": 0.5},
           {**fed, "model": "tiny", "cpu_ms_per_sample": 0.1})  # fmt: skip
    result("end_to_end-cpu", cpu, {**fed, "cpu_ms_per_sample": 0.01})
    rate, source = scaling.gpu_training_cpu_rate(tmp_path)
    assert rate == 400.0 and source.endswith("(dali-frames, batch 256, pinned to 2 cores)")
    assert "end_to_end-d" in source


def test_capacity_cpu_cost_prefers_the_measured_cpu_of_gpu_training(synth_small, tmp_path):
    """The capacity model's CPU per sample: the CPU time a GPU's DALI-fed training process
    measured, before the DALI threads' rate of a GPU loader run, before this machine's own."""
    e2e = {"mode": "pretrain", "status": "ok", "model": "full", "pipeline": "dali-frames"}
    frames = {"layout": "frames", "storage": "files", "threads": 2, "py_workers": 0}
    for name, row in (
        ("loader-a", {**frames, "pipeline": "dali-frames", "samples_per_s": 1800.0}),
        ("end_to_end-a", {**e2e, "samples_per_s": 500.0, "cpu_ms_per_sample": 2.0}),
    ):
        write_result(name, {"config": {}, "rows": [row], "summary": {"device": "cuda"}}, tmp_path)
    args = scaling._defaults(
        scaling.build_parser().parse_args(
            ["--data", str(synth_small.root), "--results-dir", str(tmp_path),
             "--per-gpu-samples-per-s", "500"]
        )
    )  # fmt: skip
    model = scaling._capacity(args, [])
    assert model["sources"]["dali_samples_per_s_per_core"].startswith(
        "measured CPU time on a GPU: end_to_end-a"
    )
    assert model["per_node"]["dali_cores_per_gpu"] == pytest.approx(500.0 / 500.0)
    os.remove(next(tmp_path.glob("end_to_end-a*.json")))
    model = scaling._capacity(args, [])
    assert model["sources"]["dali_samples_per_s_per_core"].startswith("measured on a GPU: loader-a")
    assert model["per_node"]["dali_cores_per_gpu"] == pytest.approx(500.0 / 900.0)


def test_capacity_host_memory_comes_from_the_longest_startup_result(tmp_path):
    """A rank's host memory in the capacity model: the `bench.startup` result with the longest
    list; smoke runs and runs without the loader phase are ignored."""

    def result(name, entries, config=None, **summary):
        summary = {"entries": entries, **summary}
        write_result(name, {"config": config or {}, "rows": [], "summary": summary}, tmp_path)

    assert scaling.rank_host_memory(tmp_path) is None
    result("startup-a", 500_000, {"py_workers": 2, "classes": 527}, rank_pss_mib=1458.0)
    result("startup-b", 2_000_000, {"py_workers": 2, "classes": 527}, rank_pss_mib=2003.0)
    result("startup-smoke", 9_000_000, {"smoke": True}, rank_pss_mib=1.0)
    result("startup-c", 9_000_000)  # no loader phase
    mib, source = scaling.rank_host_memory(tmp_path)
    assert mib == 2003.0 and "startup-b" in source and "2000000-clip list" in source
