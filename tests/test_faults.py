"""Runs lose nothing, never hang, and every mistake gets one sentence (exit 2, one line, nothing half-written)."""
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from automtl.cli import main
from automtl.convert import json_safe
from automtl.errors import AutomtlError
from automtl.rundir import RunDirectory

SMALL = ["--steps", "2,2,1", "--samples", "8,4", "--input-size", "16", "--quiet"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    result = cli("search", "tiny", *SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------------------------------
# data loss
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["search", "convert"])
def test_a_second_run_over_an_earlier_one_is_refused_and_the_earlier_run_kept(finished, command):
    before = snapshot(finished)
    line = one_line_error(cli(command, "tiny", *SMALL, "--out", finished), "already holds a run", "--resume", "--overwrite")
    assert "checkpoints/checkpoint.pt" in line or "supermodel.pt" in line
    assert snapshot(finished) == before


def test_overwrite_starts_over_and_resume_continues(finished, tmp_path):
    out = tmp_path / "copy"
    import shutil

    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("mine")  # a user's own file is never deleted
    assert cli("search", "tiny", *SMALL, "--out", out, "--overwrite").exit_code == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "policy.yaml").exists()
    one_line_error(cli("search", "tiny", *SMALL, "--out", out, "--overwrite", "--resume"), "give one of them")


def test_a_live_run_locks_its_folder(tmp_path):
    out = tmp_path / "busy"
    with RunDirectory(out):
        one_line_error(cli("convert", "tiny", *SMALL, "--out", out), "in use by another automtl run", str(os.getpid()))
    assert not (out / ".automtl.lock").exists()
    with RunDirectory(out):  # released: usable again
        pass


def test_resume_removes_what_a_killed_run_left_half_written(finished, tmp_path):
    import shutil

    out = tmp_path / "killed"
    shutil.copytree(finished, out)
    (out / ".automtl-stage-abc123").mkdir()
    (out / ".automtl-stage-abc123" / "model.automtl").write_bytes(b"half")
    (out / "checkpoints" / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half")
    (out / ".policy.yaml.zz.tmp").write_bytes(b"half")
    assert cli("search", "tiny", *SMALL, "--out", out, "--resume").exit_code == 0
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".automtl-stage-")]
    assert leftovers == []


def test_ctrl_c_exits_130_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "automtl", "search", "tiny", "--steps", "200,200,200", "--samples", "64,8",
           "--input-size", "16", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while time.time() < deadline and not (out / "checkpoints" / "log.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "continue it with: automtl" in err and "Traceback" not in err
    assert not (out / ".automtl.lock").exists()


# ---------------------------------------------------------------------------------------
# disk full, read-only disks: one sentence, nothing half-written
# ---------------------------------------------------------------------------------------
def _full_disk(monkeypatch, after: int = 0):
    """Every os.replace (the last step of every atomic write) fails as on a full disk, after ``after`` successes."""
    real = os.replace
    calls = {"n": 0}

    def replace(src, dst, *a, **k):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", replace)


def _torch_save_fails(monkeypatch):
    real = torch.save

    def save(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", save)
    return real


@pytest.mark.parametrize("fault", ["replace", "torch.save"])
@pytest.mark.parametrize("command", ["convert", "search"])
def test_disk_full_during_a_run(tmp_path, monkeypatch, command, fault):
    out = tmp_path / "full"
    _full_disk(monkeypatch) if fault == "replace" else _torch_save_fails(monkeypatch)
    one_line_error(cli(command, "tiny", *SMALL, "--out", out), "cannot write")
    names = [p.name for p in out.rglob("*")]
    assert not any(n.endswith(".tmp") or n.startswith(".automtl-stage-") for n in names), names
    assert not any(n in ("model.automtl", "model.pt2", "report.json") for n in names)


def test_disk_full_in_export_compact_and_render(finished, tmp_path, monkeypatch):
    model = tmp_path / "m.automtl"
    assert cli("compact", finished, "--out", model, "--quiet").exit_code == 0
    _full_disk(monkeypatch)
    for args in (["export", model, tmp_path / "m.pt2"], ["compact", finished, "--out", tmp_path / "n.automtl", "--quiet"],
                 ["render", model, tmp_path / "s.svg"]):
        one_line_error(cli(*args), "cannot write", "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.automtl"]


# ---------------------------------------------------------------------------------------
# bad input: one sentence, exit 2
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["eval", "MODEL", "--batch-size", "0"], "--batch-size"),
    (["eval", "MODEL", "--samples", "0"], "--samples"),
    (["eval", "MODEL", "--split", "bogus"], "--split"),
    (["compact", "RUN", "--finetune-steps", "-5"], "--finetune-steps"),
    (["convert", "tiny", "--input-size", "20000"], "--input-size"),
    (["supermodel", "tiny", "--input-size", "20000"], "--input-size"),
    (["convert", "tiny", "--steps", "1,2"], "--steps"),
    (["bogus-command"], "No such command"),
], ids=["eval-batch-0", "eval-samples-0", "eval-split", "finetune-negative", "input-size-convert", "input-size-supermodel",
        "steps", "unknown-command"])
def test_bad_options_are_one_sentence(finished, tmp_path, args, needle):
    model = tmp_path / "m.automtl"
    args = [str(model) if a == "MODEL" else str(finished) if a == "RUN" else a for a in args]
    one_line_error(cli(*args, *(["--out", str(tmp_path / "o")] if args[0] == "convert" else [])), needle)
    assert not (tmp_path / "o").exists()


def test_input_size_in_a_config_file_is_bounded(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbone: tiny\ninput_size: 20000\n")
    one_line_error(cli("convert", "--config", cfg, "--out", tmp_path / "o"), "input_size", "1024")


def test_backbone_file_that_exits_at_import(tmp_path):
    f = tmp_path / "net.py"
    f.write_text("import sys\nsys.exit(3)\n")
    one_line_error(cli("supermodel", f"{f}:Net"), "sys.exit(3)", "__main__")


def test_render_of_a_policy_with_absurd_task_names(tmp_path):
    policy = tmp_path / "p.yaml"
    import yaml

    policy.write_text(yaml.safe_dump({"automtl_policy": 1, "tasks": ["t" * 70000, "b"],
                                      "layers": {"l1": {"t" * 70000: "share", "b": "share"}}}))
    one_line_error(cli("render", policy, tmp_path / "p.png"), "is not a task or layer name")
    assert not (tmp_path / "p.png").exists()


def test_report_json_has_no_bare_nan():
    data = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf"), "e": 2}}
    text = json.dumps(json_safe(data), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None, "e": 2}}


def test_rundir_refuses_an_unwritable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AutomtlError, match="not writable"):
        with RunDirectory(blocker / "sub"):
            pass
