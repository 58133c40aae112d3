"""bench/gpu_session.sh without a GPU: every stage its header lists exists (and no other), and
every command a stage runs is well-formed (each benchmark's flags, train.py's config overrides,
the demo's options, inline Python's syntax). A GPU is lent for minutes; a misspelt flag found
there costs a stage of them.

The stages run for real under bash with `python3` replaced by a recorder on PATH, so nothing is
computed and nothing is rendered."""

from __future__ import annotations

import importlib
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_session.sh"
# Stages that only wait or archive: they start no Python.
NO_PYTHON = {"pack", "wait-data", "wait-b64", "wait-b256"}
# Stages that start their work in the background run with the stage that waits for it.
WITH_WAIT = {
    "bench-data": "wait-data",
    "bench-data-b64": "wait-b64",
    "bench-data-b256": "wait-b256",
}


def documented_stages(text: str) -> list[str]:
    """The stage names of the header comment's "Stages:" list (parenthesised notes dropped)."""
    header = []
    for line in text.splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    joined = " ".join(header)
    listed = joined[joined.index("Stages:") + len("Stages:") :]
    listed = re.sub(r"\([^)]*\)", "", listed).rstrip(" .")
    return [name.strip() for name in re.split(r"[,+]", listed) if name.strip()]


def case_stages(text: str) -> list[str]:
    """The stage names the script's `case` handles."""
    return re.findall(r"^    ([a-z0-9][a-z0-9-]*)\)", text, flags=re.MULTILINE)


def test_every_documented_stage_is_handled_and_every_handled_one_documented():
    text = SCRIPT.read_text()
    documented, handled = documented_stages(text), case_stages(text)
    assert all(re.fullmatch(r"[a-z0-9-]+", name) for name in documented), documented
    assert len(set(handled)) == len(handled), "a stage is handled twice"
    assert sorted(documented) == sorted(handled), (
        f"documented only: {sorted(set(documented) - set(handled))}; "
        f"handled only: {sorted(set(handled) - set(documented))}"
    )


def _recorder(bin_dir: Path, log: Path) -> None:
    """A `python3` that appends its arguments to `log` as one JSON line and succeeds."""
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'name, driver_version, memory.total [MiB]'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)


def _check_command(argv: list[str]) -> None:
    """Parse one recorded `python3` command the way the real program would parse it."""
    if argv[0] == "-c":
        compile(argv[1], "<python3 -c>", "exec")
        return
    if argv[0] == "train.py":
        from train import parse_command

        parse_command(argv[1:])
        return
    assert argv[0] == "-m", argv
    module, args = argv[1], argv[2:]
    if module == "pytest":  # the suite, or test files of it that exist
        paths = [a for a in args if a == "tests" or a.startswith("tests/")]
        assert paths and all((REPO / a).exists() for a in paths), argv
    elif module == "equiav.demo":
        from equiav.config import default_config, load_config
        from equiav.demo import build_parser

        _, config_args = build_parser().parse_known_args(args)
        load_config(config_args, default_config())
    else:
        assert module.startswith("bench."), f"unexpected module in {argv}"
        importlib.import_module(module).build_parser().parse_args(args)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict[str, list[list[str]]]:
    """Each stage run alone by the script with the recording python3: stage -> its commands."""
    root = tmp_path_factory.mktemp("gpu-session")
    stages = case_stages(SCRIPT.read_text())
    out: dict[str, list[list[str]]] = {}
    for stage in stages:
        log = root / f"{stage}.jsonl"
        _recorder(root / f"bin-{stage}", log)
        env = dict(
            os.environ,
            PATH=f"{root / f'bin-{stage}'}{os.pathsep}{os.environ['PATH']}",
            OUT=str(root / "out"),
            RESULTS=str(root / "results"),
            DATA=str(root / "data"),
            DATA_B64=str(root / "data-b64"),
            DATA_B256=str(root / "data-b256"),
        )
        # From a scratch folder: stages that clean or copy under runs/ touch only that.
        run = subprocess.run(
            ["bash", str(SCRIPT), stage, *([WITH_WAIT[stage]] if stage in WITH_WAIT else [])],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        # Its exit status is its last command's (a copy of a result the recorder never wrote
        # fails): what must not happen is bash failing to run the stage as written.
        for fault in ("syntax error", "unbound variable", "command not found", "unknown stage"):
            assert fault not in run.stdout + run.stderr, (stage, run.stdout, run.stderr)
        lines = log.read_text().splitlines() if log.exists() else []
        out[stage] = [json.loads(line) for line in lines]
    return out


def test_every_stage_that_computes_starts_python(recorded):
    silent = sorted(s for s, cmds in recorded.items() if not cmds and s not in NO_PYTHON)
    assert not silent, f"stages that ran no python3: {silent}"


def test_every_recorded_command_parses(recorded, monkeypatch):
    monkeypatch.chdir(REPO)  # configs/ and train.py are named relative to the repository
    checked = 0
    for stage, commands in recorded.items():
        for argv in commands:
            try:
                _check_command(argv)
            except SystemExit as e:  # argparse's way of rejecting a flag
                pytest.fail(f"stage {stage}: {argv} is rejected (exit {e.code})")
            checked += 1
    assert checked >= len(recorded) - len(NO_PYTHON)


def test_a_misspelt_flag_is_caught(monkeypatch):
    """The check itself: a flag the benchmark does not have, or a config key that does not
    exist, is rejected."""
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        _check_command(["-m", "bench.step", "--batch-sizes", "128"])
    from equiav.config import ConfigError

    bad_key = ["--config", "configs/demo.yaml", "--set", "train.no_such_key=1"]
    with pytest.raises(ConfigError, match="no_such_key"):
        _check_command(["train.py", "pretrain", *bad_key])
