"""Every code block of the README runs, as written.

The two set-up commands: the test command is what CI runs (checked here verbatim against
.ci/run); the main job runs in a slow test. The other blocks run here, in a scratch
directory that sees the repository's .venv and examples.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, re.S)
SETUP_MAIN, SETUP_TESTS = BLOCKS[0][1].strip(), BLOCKS[1][1].strip()
OTHERS = [(lang, code) for lang, code in BLOCKS[2:]]


def scratch(tmp_path):
    """A working directory with the repository's .venv and examples, like a user's checkout."""
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return tmp_path, env


def test_the_two_setup_commands_come_first_and_ci_runs_the_test_command():
    assert SETUP_MAIN.startswith("bash scripts/setup.sh && ") and "automtl convert" in SETUP_MAIN
    assert SETUP_TESTS.startswith("bash scripts/setup.sh && ") and "pytest" in SETUP_TESTS
    assert SETUP_TESTS in (ROOT / ".ci" / "run").read_text()
    assert "BENCHMARK_TABLE" not in README


@pytest.mark.parametrize("index", range(len(OTHERS)))
def test_readme_block_runs(index, tmp_path):
    lang, code = OTHERS[index]
    cwd, env = scratch(tmp_path)
    if lang == "python":
        cmd = [sys.executable, "-c", code]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_main_job_command(tmp_path):
    """The README's main job, verbatim, in a fresh clone with its own .venv (a few minutes)."""
    copy = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(copy)], check=True)
    proc = subprocess.run(["bash", "-c", SETUP_MAIN], cwd=copy, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = copy / "runs" / "quickstart"
    for name in ("model.automtl", "model.pt2", "policy.yaml", "sharing.svg", "report.json", "config.yaml"):
        assert (out / name).stat().st_size > 0
