"""A regular (non-editable) install holds the whole package: every subpackage, the builtin backbones."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_PROBE = textwrap.dedent("""
    import sys, torch, automtl
    assert automtl.__file__.startswith(sys.argv[1]), automtl.__file__
    import automtl.formats, automtl.search, automtl.data, automtl.backbones
    names = [s.name for s in automtl.list_backbones()]
    assert names[0] == "tiny" and "resnet18" in names, names
    sm = automtl.supermodel("tiny", [automtl.Task("c", kind="classification", classes=3)],
                            example_input=torch.randn(1, 3, 32, 32))
    out = sm(torch.randn(2, 3, 32, 32))
    assert out["c"].shape == (2, 3), out["c"].shape
    print("ok", len(names))
""")


@pytest.mark.skipif(importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None,
                    reason="needs pip and setuptools to build the package")
def test_regular_install_imports_lists_backbones_and_builds_a_supermodel(tmp_path):
    # Build from a clean copy: a stale build/ beside the sources could hide a missing package.
    src = tmp_path / "src"
    shutil.copytree(REPO / "automtl", src / "automtl", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(src)], check=True, capture_output=True, timeout=300)
    assert not (target / "backbones").exists()  # it lives inside the package, not beside it
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _PROBE, str(target)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("ok")
