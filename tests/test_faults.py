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
from torch import nn
from click.testing import CliRunner

from automtl.cli import main
from automtl.convert import json_safe
from automtl.errors import AutomtlError
from automtl.rundir import RunDirectory
from conftest import deflate

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
    # on an --out with no run yet, the refusal alone (no "holds no checkpoint ... starts from the beginning" first)
    one_line_error(cli("search", "tiny", *SMALL, "--out", tmp_path / "empty", "--overwrite", "--resume"), "give one of them")


@pytest.mark.parametrize("command", ["search", "convert"])
@pytest.mark.parametrize("mistake", [["nosuchnet"], ["tiny", "--strategy", "bogus"], ["tiny", "--weighting", "bogus"]])
def test_overwrite_with_a_mistake_found_late_puts_the_earlier_run_back(finished, tmp_path, command, mistake):
    """The backbone is resolved only when it is built: a typo there must not cost the earlier run."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    before = snapshot(out)
    one_line_error(cli(command, *mistake, *SMALL, "--out", out, "--overwrite"))
    assert snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".automtl-replaced-")]


@pytest.mark.parametrize("link", ["folder", "checkpoints"])
def test_a_set_aside_folder_that_is_a_link_moves_nothing_out_of_its_target(tmp_path, link):
    """A run folder holding ``.automtl-replaced-x`` as a link to another folder (or such a folder whose
    ``checkpoints`` is a link): entering the run moved that folder's files named like run outputs into the run, and
    deleted them there."""
    victim = tmp_path / "victim"
    (victim / "checkpoints").mkdir(parents=True)
    for name in ("model.automtl", "config.yaml", "report.json", "checkpoints/checkpoint.pt"):
        (victim / name).write_text("someone else's file\n")
    before = snapshot(victim)
    out = tmp_path / "run"
    out.mkdir()
    if link == "folder":
        (out / ".automtl-replaced-x").symlink_to(victim)
    else:
        (out / ".automtl-replaced-x").mkdir()
        (out / ".automtl-replaced-x" / "checkpoints").symlink_to(victim / "checkpoints")
    cli("search", "tiny", *SMALL, "--out", out)
    assert snapshot(victim) == before


@pytest.mark.parametrize("name", [".automtl.lock", "checkpoints", "checkpoints/log.jsonl", "checkpoints/checkpoint.pt",
                                  "policy.yaml"])
@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_run_folder_s_own_names_as_links_are_refused_before_anything_is_written(finished, tmp_path, name, flag):
    """A folder handed over whose lock file, checkpoints folder or run files are links: the lock's target was
    truncated to a process id, a checkpoints link sent checkpoint, log and policy into another folder (and cleaned
    its temporaries), a dangling log link created its target. Refused in one sentence; nothing is followed."""
    import shutil

    victim = tmp_path / "victim"
    (victim / "checkpoints").mkdir(parents=True)
    for file in ("precious.txt", "log.jsonl", "checkpoint.pt", ".notes.tmp", "policy.yaml"):
        (victim / file).write_text("someone else's file\n")
    before = snapshot(victim)
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (shutil.rmtree if (out / name).is_dir() else Path.unlink)(out / name) if (out / name).exists() else None
    target = {"checkpoints": victim}.get(name, victim / ("precious.txt" if name == ".automtl.lock" else "new.txt"))
    (out / name).symlink_to(target)  # new.txt does not exist: a dangling link
    one_line_error(cli("search", "tiny", *SMALL, "--out", out, flag), "as a link", "remove the link")
    assert snapshot(victim) == before and not (victim / "new.txt").exists()


def test_a_resumed_log_that_is_gone_is_started_again_in_the_folder(finished, tmp_path):
    """A resume whose log.jsonl is missing starts a new one where the run keeps it (Python's search, no RunDirectory:
    a dangling link there is replaced, not followed)."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    outside = tmp_path / "outside.txt"
    (out / "checkpoints" / "log.jsonl").unlink()
    (out / "checkpoints" / "log.jsonl").symlink_to(outside)
    from automtl.search._log import _LogMixin

    class Log(_LogMixin):
        log_path, start = out / "checkpoints" / "log.jsonl", 0
        dist = type("D", (), {"main": True})()

    log = Log()
    log._open_log(resumed=True)
    log._log_file.write("{}\n")
    log._log_file.close()
    assert not outside.exists() and not (out / "checkpoints" / "log.jsonl").is_symlink()


def test_an_overwrite_killed_before_its_first_checkpoint_gets_the_earlier_run_back(finished, tmp_path):
    """SIGKILL runs no cleanup: the next run in the folder settles what the killed one set aside."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    before = snapshot(out)
    run = RunDirectory(out, overwrite=True)
    run.__enter__()  # set aside, then "killed": no __exit__
    run._release()
    assert not (out / "checkpoints" / "checkpoint.pt").exists()
    one_line_error(cli("search", "tiny", *SMALL, "--out", out), "already holds a run")  # put back, and refused
    assert snapshot(out) == before


def test_a_live_run_locks_its_folder(tmp_path):
    out = tmp_path / "busy"
    with RunDirectory(out):
        one_line_error(cli("convert", "tiny", *SMALL, "--out", out), "in use by another automtl run", str(os.getpid()))
        # --resume said first that the run "starts from the beginning", then refused it (helper-78): only the refusal
        one_line_error(cli("search", "tiny", *SMALL, "--out", out, "--resume"), "in use by another automtl run")
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


def _interrupt(out, *extra, wait_for="checkpoints/checkpoint.pt"):
    """Start a long ``automtl search`` into ``out``, press Ctrl-C once ``wait_for`` exists; (exit code, stderr).

    The search runs on one thread: beside the other test worker, torch's default threads (one per core) spin for
    each other, and a run that checkpoints at step 100 within 8 s alone had taken 40 steps in 120 s."""
    cmd = [sys.executable, "-m", "automtl", "search", "tiny", "--steps", "10000,10000,10000", "--samples", "64,8",
           "--input-size", "16", "--quiet", "--out", str(out), *map(str, extra)]
    started = time.time()
    # as from a terminal: a shell's background job (as CI may run us) inherits SIGINT ignored
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600
    while time.time() < deadline and not ((out / wait_for).exists() and (out / wait_for).stat().st_mtime >= started):
        time.sleep(0.2)
    if not (out / wait_for).exists():
        proc.kill()
        proc.communicate()
        raise AssertionError(f"the search wrote no {wait_for} in 600 s")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_ctrl_c_exits_130_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "interrupted"
    code, err = _interrupt(out)
    assert code == 130, err
    assert "--resume" in err and "continue it with: automtl" in err and "Traceback" not in err
    assert not (out / ".automtl.lock").exists()


def test_ctrl_c_before_the_first_checkpoint_says_so_and_keeps_the_earlier_run(tmp_path):
    """Nothing to resume: no resume hint (it would start from the earlier run's checkpoint, or fail on
    --overwrite), and an --overwrite's earlier run is back in place."""
    out = tmp_path / "run"
    assert cli("search", "tiny", *SMALL, "--out", out).exit_code == 0
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".automtl.lock"}
    config = tmp_path / "late.yaml"
    config.write_text("search:\n  checkpoint_every: 0\n")  # checkpoints only at the end of a stage
    code, err = _interrupt(out, "--config", config, "--overwrite", wait_for="checkpoints/log.jsonl")
    assert code == 130, err
    assert "before the first checkpoint" in err and "earlier run in --out is as it was" in err, err
    assert "--resume" not in err and "Traceback" not in err
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".automtl.lock"}
    assert after == before


def test_ctrl_c_before_the_first_checkpoint_of_a_new_run_leaves_nothing_and_the_command_runs_again(tmp_path):
    """"Run the command again" was refused: the interrupted run's log.jsonl stayed and counted as an earlier run."""
    out = tmp_path / "new" / "run"
    config = tmp_path / "late.yaml"
    config.write_text("search:\n  checkpoint_every: 0\n")
    code, err = _interrupt(out, "--config", config, wait_for="checkpoints/log.jsonl")
    assert code == 130 and "nothing to continue" in err and "run the command again" in err, err
    assert not (tmp_path / "new").exists()
    assert cli("search", "tiny", *SMALL, "--out", out).exit_code == 0


@pytest.mark.parametrize("command", ["search", "sweep"])
def test_ctrl_c_that_a_library_swallows_still_ends_the_command_as_an_interrupt(tmp_path, monkeypatch, command):
    """Ctrl-C landing in one of torch's lazy imports left a half-imported module whose AttributeError came later, and
    was reported as "torch.fx cannot trace the backbone" (exit 2): the interrupt is noted as well as raised."""
    import automtl.convert

    def swallowing(cfg):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:  # what some library code does with it
            pass
        raise AutomtlError("torch.fx cannot trace the backbone (module 'torch._dynamo' has no attribute 'guards')")

    monkeypatch.setattr(automtl.convert, "build_supermodel", swallowing)
    extra = ["--budgets", "1.0x,1.5x"] if command == "sweep" else []
    # as from a terminal: a shell's background job (as the suite may be run) starts with SIGINT ignored, and the
    # command then leaves it so (no Ctrl-C can reach it)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = CliRunner().invoke(main, [command, "tiny", *SMALL, *extra, "--out", str(tmp_path / "run")])
        handler = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "cannot trace" not in result.output
    if command == "sweep":  # what a sweep's own interrupt says: its finished runs are kept
        assert "finished runs are kept, continue the sweep with" in result.output
    assert handler is signal.default_int_handler  # put back


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


def _torch_save_fails(monkeypatch, message="[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed "
                                          "writing file data/0: file write failed"):
    real = torch.save

    def save(obj, f, *a, **k):
        raise RuntimeError(message)
    monkeypatch.setattr(torch, "save", save)
    return real


@pytest.mark.parametrize("fault", ["replace", "torch.save", "torch.save short write"])
@pytest.mark.parametrize("command", ["convert", "search"])
def test_disk_full_during_a_run(tmp_path, monkeypatch, command, fault):
    out = tmp_path / "full"
    if fault == "replace":
        _full_disk(monkeypatch)
    elif fault == "torch.save":
        _torch_save_fails(monkeypatch)
    else:  # what a tmpfs that fills up mid-checkpoint gives
        _torch_save_fails(monkeypatch, "[enforce fail at inline_container.cc:672] . unexpected pos 1152 vs 1086")
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
    (["convert", "tiny", "--samples", "99999999999999999999,4"], "train_samples"),
    (["eval", "MODEL", "--samples", "100000000000"], "--samples"),
    (["bogus-command"], "No such command"),
], ids=["eval-batch-0", "eval-samples-0", "eval-split", "finetune-negative", "input-size-convert", "input-size-supermodel",
        "steps", "samples-huge", "eval-samples-huge", "unknown-command"])
def test_bad_options_are_one_sentence(finished, tmp_path, args, needle):
    model = tmp_path / "m.automtl"
    args = [str(model) if a == "MODEL" else str(finished) if a == "RUN" else a for a in args]
    one_line_error(cli(*args, *(["--out", str(tmp_path / "o")] if args[0] == "convert" else [])), needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, needle", [
    ("search: 5\n", "'search' must be a mapping"), ("search: [1, 2]\n", "'search' must be a mapping"),
    ("search: {search_steps: 100000000000000000000}\n", "search_steps"),
    ("search: {seed: 99999999999999999999999}\n", "seed"),
    ("search: []\n", "'search' must be a mapping"),
    ("search: {seed: 1" + "0" * 5000 + "}\n", "holds a value automtl cannot read"),
    ("budget: 1.5x\nsearch: {budget: 2.0x}\n", "gives 'budget' twice"),
    ("train_samples: 1000000000000\n", "train_samples"),
    ("budget: 1e400x\n", "beyond any model size"),
])
def test_config_sections_and_huge_numbers_are_one_sentence(tmp_path, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbone: tiny\n" + text)
    one_line_error(cli("convert", "--config", cfg, "--out", tmp_path / "o"), needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["convert", "search"])
def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, command):
    """An error found once the run folder is locked (the backbone is built inside it) removes the folders
    the run made, and only those."""
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new" / "deeper" / "o", tmp_path / "kept" / "o"):
        one_line_error(cli(command, "no_such_net", *SMALL, "--out", out), "unknown backbone 'no_such_net'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_an_out_folder_the_system_cannot_make_is_one_sentence(tmp_path):
    one_line_error(cli("search", "tiny", *SMALL, "--out", tmp_path / ("x" * 300) / "o"), "not writable")
    assert not any(tmp_path.iterdir())


def test_a_failed_run_removes_only_empty_folders_it_made(tmp_path):
    """A folder the run made but someone else wrote into meanwhile stays, with what was written."""
    from automtl.errors import AutomtlError

    out = tmp_path / "new" / "o"
    with pytest.raises(AutomtlError):
        with RunDirectory(out):
            (tmp_path / "new" / "theirs.txt").write_text("mine")
            raise AutomtlError("the run failed")
    assert not out.exists() and (tmp_path / "new" / "theirs.txt").read_text() == "mine"
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)  # empty, and not the run's: '..' leads back to it
    with pytest.raises(AutomtlError):
        with RunDirectory(tmp_path / "old" / "x" / ".."):
            raise AutomtlError("the run failed")
    assert (tmp_path / "old" / "checkpoints").is_dir() and not (tmp_path / "old" / "x").exists()


def test_a_missing_dot_is_said_before_any_training(tmp_path, monkeypatch):
    import shutil

    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "dot" else real(name, *a, **k))
    one_line_error(cli("convert", "tiny", *SMALL, "--out", tmp_path / "o"), "'dot'")
    assert not (tmp_path / "o").exists()


def test_input_size_in_a_config_file_is_bounded(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbone: tiny\ninput_size: 20000\n")
    one_line_error(cli("convert", "--config", cfg, "--out", tmp_path / "o"), "input_size", "1024")


@pytest.mark.parametrize("field,value,needle", [
    ("input_size", 4, "input_size"), ("backbone", 3, "backbone"), ("search", 5, "search must be"),
    ("search", {"budget": "abc"}, "budget 'abc'"), ("train_samples", 0, "train_samples"), ("tasks", ["x"], "task 'x'"),
    ("search.lr", -1, "'lr'"), ("tasks", "depth:depth", "non-empty list"), ("tasks", [], "non-empty list"),
])
def test_a_config_changed_after_it_was_made_is_checked_before_anything_is_written(tmp_path, field, value, needle):
    """Assignment skips the dataclass's checks: convert checks the whole config again before it makes ``out``."""
    from automtl.convert import ConvertConfig, convert
    from automtl.errors import ConfigError

    cfg = ConvertConfig(backbone="tiny", input_size=16)
    target, name = (cfg.search, "lr") if field == "search.lr" else (cfg, field)
    setattr(target, name, value)
    with pytest.raises(ConfigError, match=needle):
        convert(cfg, tmp_path / "o", quiet=True)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("entry", ["search_run", "sweep"])
def test_a_bad_config_leaves_an_earlier_run_alone_even_with_overwrite(tmp_path, entry):
    from automtl.convert import ConvertConfig
    from automtl.errors import ConfigError
    from automtl.runs import search_run
    from automtl.sweep import sweep

    out = tmp_path / "o"
    out.mkdir()
    (out / "report.json").write_text("{}")
    cfg = ConvertConfig(backbone="tiny", input_size=16)
    cfg.input_size = 4
    with pytest.raises(ConfigError, match="input_size"):
        search_run(cfg, out, overwrite=True, quiet=True) if entry == "search_run" else sweep(cfg, "1.5x", out, overwrite=True)
    assert (out / "report.json").read_text() == "{}"


def test_a_path_is_a_weights_file():
    from automtl.convert import ConvertConfig

    assert ConvertConfig(weights=Path("w.pt")).weights == "w.pt"


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


# ---------------------------------------------------------------------------------------
# the Python API's search: bad data named at once
# ---------------------------------------------------------------------------------------
def _search_on(batches, tasks=None, steps=(2, 0, 0)):
    import automtl
    from automtl import SearchConfig, Task

    tasks = tasks or [Task("seg", "segmentation", classes=3), Task("depth", "depth")]
    sm = automtl.supermodel("tiny", tasks, torch.randn(1, 3, 16, 16))
    cfg = SearchConfig(warmup_steps=steps[0], search_steps=steps[1], finetune_steps=steps[2], batch_size=2, quiet=True,
                       budget=None)
    return automtl.search(sm, batches, batches[:1], cfg)


def _batch(n=2, c=3, seg=None, depth=None):
    x = torch.randn(n, c, 16, 16)
    return x, {"seg": torch.randint(0, 3, (n, 16, 16)) if seg is None else seg,
               "depth": torch.rand(n, 1, 16, 16) + 0.1 if depth is None else depth}


@pytest.mark.parametrize("make, message", [
    (lambda: [_batch(seg=torch.full((2, 16, 16), 7))], "label 7 outside 0..2"),
    (lambda: [_batch(c=1)], "1 channels but the backbone takes 3"),
    (lambda: [(torch.randn(2, 3, 16, 16), {"seg": [[0] * 16] * 16, "depth": torch.rand(2, 1, 16, 16)})], "is a list"),
    (lambda: [_batch(depth=torch.rand(2, 3, 16, 16))], "depth target is (B, 16, 16) or (B, 1, 16, 16)".replace("16", "*")),
    (lambda: [(torch.full((2, 3, 16, 16), float("nan")), _batch()[1])], "NaN or infinite"),
    (lambda: [_batch(seg=torch.full((2, 16, 16), 255))] * 4, "no usable label"),
    (lambda: [(torch.randn(2, 3, 16, 16, dtype=torch.float64), _batch()[1])], "float64 images but the model takes float32 ones"),
    (lambda: [((torch.rand(2, 3, 16, 16) * 255).to(torch.uint8), _batch()[1])], "uint8 images of shape (2, 3, 16, 16)"),
    (lambda: [_batch(seg=torch.full((2, 16, 16), 1.5))], "label 1.5, which is not a class id"),
], ids=["label-range", "channels", "list-target", "depth-shape", "nan-image", "no-label", "float64-images",
        "uint8-images", "fractional-label"])
def test_search_names_bad_data(make, message, monkeypatch):
    from automtl.data import checks
    from automtl.errors import DataError

    monkeypatch.setattr(checks, "NO_LABEL_BATCHES", 3)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        _search_on(make(), steps=(4, 0, 0))


@pytest.mark.parametrize("val, message", [
    ([_batch(seg=torch.full((2, 16, 16), 7))], "label 7 outside 0..2"),
    ([(torch.randn(2, 3, 16, 16, dtype=torch.float64), _batch()[1])], "float64 images"),
    ([], "validation data yielded no batches"),
], ids=["label-range", "float64-images", "empty"])
def test_bad_validation_data_is_refused_before_training(val, message):
    """Validation batches get the training batches' checks, and the first one is checked before any training: a bad
    label there was an IndexError from inside a loss after the whole run, an empty set all-NaN metrics."""
    import automtl
    from automtl import SearchConfig, Task
    from automtl.errors import DataError

    sm = automtl.supermodel("tiny", [Task("seg", "segmentation", classes=3), Task("depth", "depth")],
                            torch.randn(1, 3, 16, 16))
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    cfg = SearchConfig(warmup_steps=2, search_steps=0, finetune_steps=0, batch_size=2, quiet=True, budget=None)
    with pytest.raises(DataError, match=message):
        automtl.search(sm, [_batch(), _batch()], val, cfg)
    assert all(torch.equal(v, sm.state_dict()[k]) for k, v in before.items())  # refused before a step
    with pytest.raises(DataError, match=message):  # and by evaluate, which the final validation and `eval` call
        automtl.evaluate(sm, val)


def test_small_slips_get_the_right_hint():
    """`device: gpu` was offered "did you mean 'cpu'?"; a sample of three items was "it yielded list"."""
    from automtl import SearchConfig
    from automtl.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match="'device' is 'gpu'; did you mean 'cuda'"):
        SearchConfig(device="gpu").validate()
    x, y = _batch()
    with pytest.raises(DataError, match=r"must yield \(x, \{task: target\}\) pairs; it yielded a list of 3 items"):
        _search_on([[x, y, y]])
    with pytest.raises(DataError, match=r"float32 images of shape \(3, 16, 16\).*one image \(C, H, W\), not a batch: "
                                         r"give samples as a Dataset"):
        _search_on([(x[0], {k: v[0] for k, v in y.items()})])  # a list of samples read as batches


class _CallableMetric(nn.Module):
    """torchmetrics' way: a metric is an nn.Module, so an instance is callable."""

    def update(self, pred, target):
        pass

    def compute(self):
        return {"m": 0.0}


class _CastsItsInput(nn.Module):
    """Weights in float64, images taken in float32 and cast by the forward (as HuggingFace's vision models do)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1).double(), nn.Conv2d(8, 8, 3, stride=2, padding=1).double()

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x.to(self.c1.weight.dtype))))


def test_images_are_checked_against_what_the_backbone_takes_not_its_weights():
    """The images' dtype is the example input's: a backbone that casts its own input takes float32 images whatever
    its weights are (the check compared them with the weights' dtype and refused a run that worked)."""
    import automtl
    from automtl import SearchConfig, Task
    from automtl.errors import DataError

    tasks = [Task("seg", "segmentation", classes=3), Task("depth", "depth")]
    sm = automtl.supermodel(_CastsItsInput(), tasks, torch.randn(1, 3, 16, 16))
    cfg = SearchConfig(warmup_steps=1, search_steps=0, finetune_steps=0, batch_size=2, quiet=True, budget=None)
    automtl.search(sm, [_batch(), _batch()], [_batch()], cfg)
    sm = automtl.supermodel(_CastsItsInput(), tasks, torch.randn(1, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(DataError, match="float32 images but the model takes float64 ones"):
        automtl.search(sm, [_batch(), _batch()], [_batch()], cfg)


class _FloatCompute:
    def update(self, pred, target):
        pass

    def compute(self):
        return 0.5


@pytest.mark.parametrize("how, message", [
    ("per-sample loss", r"the loss of task 'bright' returned a float32 tensor of shape \(2,\); a loss returns one number"),
    ("float loss", r"the loss of task 'bright' returned a float;"),
    ("metric instance", r"task 'bright': metric= takes a class .*not RegressionMetric\(\); got a RegressionMetric"),
    ("callable metric instance", r"task 'bright': metric= takes a class .*got a _CallableMetric"),
    ("metric without update", r"the metric of task 'bright' made a dict, which has no update\(\) and compute\(\)"),
    ("compute of a float", r"the metric of task 'bright' returned float '0.5' from compute\(\); compute\(\) returns a dict"),
    ("head of another kind", r"task 'bright': head= takes an nn.Module, got a function"),
])
def test_a_custom_task_s_own_parts_are_checked_in_one_sentence(how, message):
    """Mistakes in a custom task's loss or metric were tracebacks from inside the search (`shape '[]' is invalid`,
    `'float' object has no attribute 'detach'`, `'RegressionMetric' object is not callable` after the whole run)."""
    import automtl
    from automtl import SearchConfig, Task
    from automtl.errors import ConfigError
    from automtl.metrics import RegressionMetric

    def loss(p, y):
        steps.append(torch.is_grad_enabled())  # a training step's loss (validation runs without gradients)
        per_sample = (p.mean((1, 2, 3)) - y) ** 2
        return {"per-sample loss": per_sample, "float loss": 0.5}.get(how, per_sample.mean())

    steps = []
    metric = {"metric instance": RegressionMetric(), "callable metric instance": _CallableMetric(),
              "metric without update": dict,
              "compute of a float": _FloatCompute}.get(how, RegressionMetric)
    head = (lambda f: f) if how == "head of another kind" else nn.Sequential(nn.Conv2d(32, 1, 1), nn.AdaptiveAvgPool2d(1))
    batches = [(x, {"bright": x.mean((1, 2, 3))}) for x, _ in (_batch(), _batch())]
    with pytest.raises(ConfigError, match=message):
        task = Task("bright", head=head, loss=loss, metric=metric)
        sm = automtl.supermodel("tiny", [task], torch.randn(1, 3, 16, 16))
        automtl.search(sm, batches, batches[:1], SearchConfig(warmup_steps=1, search_steps=0, finetune_steps=0,
                                                              batch_size=2, quiet=True, budget=None))
    if "metric" in how or "compute" in how:  # found before any training step
        assert True not in steps, steps


def test_the_setup_look_at_validation_data_takes_partial_labels():
    """A task's own metric is evaluated on the first validation batch at setup: a first batch without that task's
    target is partial labels (the run validates on all batches), not a task the data lacks."""
    import automtl
    from automtl import SearchConfig, Task
    from automtl.metrics import RegressionMetric

    def batch(bright=True):
        x, y = _batch()
        return x, {"depth": y["depth"], **({"bright": x.mean((1, 2, 3)).view(2, 1, 1, 1)} if bright else {})}

    bright = Task("bright", head=nn.Sequential(nn.Conv2d(32, 1, 1), nn.AdaptiveAvgPool2d(1)),
                  loss=lambda p, y: ((p - y) ** 2).mean(), metric=RegressionMetric)
    sm = automtl.supermodel("tiny", [Task("depth", "depth"), bright], torch.randn(1, 3, 16, 16))
    result = automtl.search(sm, [batch(), batch()], [batch(False), batch()], SearchConfig(
        warmup_steps=1, search_steps=0, finetune_steps=0, batch_size=2, quiet=True, budget=None))
    assert result.metrics["bright"]["mae"] == result.metrics["bright"]["mae"]  # measured on the second batch


def test_a_task_the_data_has_no_target_for_is_named_not_trained_on_nothing():
    """The README example named its task 'segment' on data whose target is 'segmentation': NaN metrics, no error."""
    from automtl.errors import DataError

    x, y = _batch()
    with pytest.raises(DataError, match="no target for task 'seg'.*'segment'"):
        _search_on([(x, {"segment": y["seg"], "depth": y["depth"]})], steps=(2, 0, 0))


def test_a_run_shorter_than_the_grace_period_says_which_task_had_no_target():
    """Without validation data, a misspelled target key trained silently when the run had fewer than 16 batches."""
    import automtl
    from automtl import SearchConfig, Task

    x, y = _batch()
    sm = automtl.supermodel("tiny", [Task("seg", "segmentation", classes=3), Task("depth", "depth")],
                            torch.randn(1, 3, 16, 16))
    with pytest.warns(UserWarning, match=r"training data had no target for task 'seg' in 3 batches.*'segment'.*fewer "
                                         r"batches than the 16"):
        automtl.search(sm, [(x, {"segment": y["seg"], "depth": y["depth"]})], None,
                       SearchConfig(warmup_steps=3, search_steps=0, finetune_steps=0, batch_size=2, quiet=True,
                                    budget=None))


def test_partial_labels_in_a_shared_loader_still_train_and_evaluate():
    """A batch may lack a task's target (partial labels); only a task that never has one is an error."""
    x, y = _batch()
    batches = [(x, {"seg": y["seg"], "depth": y["depth"]}), (x, {"seg": y["seg"]})]  # validation: the first
    result = _search_on(batches, steps=(2, 0, 0))
    assert set(result.metrics) == {"seg", "depth"}


def test_search_on_an_empty_dataset():
    from torch.utils.data import TensorDataset

    from automtl.errors import DataError

    with pytest.raises(DataError, match="empty"):
        _search_on(TensorDataset(torch.empty(0, 3, 16, 16)))


# ---------------------------------------------------------------------------------------
# two gloo ranks
# ---------------------------------------------------------------------------------------
DDP_WORKER = Path(__file__).with_name("ddp_fault_worker.py")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, timeout=180, **env):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]), **env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(DDP_WORKER), json.dumps(args)]
    return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, text=True)


def test_a_loss_without_gradient_on_one_rank_is_reduced_over_the_same_parameters(tmp_path):
    proc = _torchrun({"case": "asymmetric", "result": str(tmp_path / "rank{rank}.pt")})
    assert proc.returncode == 0, proc.stdout[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys() and r0
    assert all(torch.equal(r0[k], r1[k]) for k in r0)


def test_a_frozen_rank_times_out_with_a_sentence_naming_the_rank(tmp_path):
    start = time.time()
    proc = _torchrun({"case": "freeze", "result": str(tmp_path / "rank{rank}.pt")}, timeout=150, AUTOMTL_DIST_TIMEOUT="5")
    assert proc.returncode != 0
    assert "rank 0 lost the other ranks" in proc.stdout or "rank 0 could not join" in proc.stdout, proc.stdout[-3000:]
    assert time.time() - start < 140


def test_distributed_without_torchrun_is_one_sentence(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), AUTOMTL_DIST_TIMEOUT="3")
    proc = subprocess.run([sys.executable, "-m", "automtl", "search", "tiny", *SMALL, "--out", str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "rank 0 could not join" in proc.stderr and "torchrun" in proc.stderr


@pytest.mark.parametrize("name", ["eval", "to", "training", "forward", "__init__", "class", "_graph"])
def test_a_task_named_like_a_module_method_gets_one_sentence(name, tmp_path):
    """A task's head is a module named after the task; `eval` or `to` would reach the module's own method
    (torch refused it with a raw KeyError in supermodel())."""
    from automtl import Task
    from automtl.errors import ConfigError

    with pytest.raises(ConfigError, match=f"task name '{name}' is a name torch modules or Python use for themselves"):
        Task(name, "depth")
    result = cli("convert", "tiny", "--task", f"{name}:depth", "--steps", "1,1,1", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"task name '{name}'" in result.output and not (tmp_path / "run").exists()


def test_a_run_that_fails_before_its_first_step_can_be_run_again_as_corrected(tmp_path):
    """An unwritable --tensorboard is found after the log is opened: the empty log went with the folder, so
    the corrected command is not refused as an earlier run's."""
    out = tmp_path / "run"
    args = ["convert", "tiny", "--steps", "1,1,1", "--samples", "8,4", "--input-size", "16", "--quiet", "--out", out]
    (tmp_path / "file").write_text("")
    failed = cli(*args, "--tensorboard", tmp_path / "file" / "tb")
    assert failed.exit_code == 2 and "Traceback" not in failed.output, failed.output
    assert not out.exists()
    assert cli(*args).exit_code == 0


def test_a_backbone_failing_at_the_example_size_is_one_sentence_without_torchs_traceback(capfd):
    """torch's ShapeProp printed the failing node's traceback itself (27 lines above the sentence)."""
    from automtl.errors import BackboneError
    from automtl.supermodel import supermodel
    from automtl.tasks import Task

    with pytest.raises(BackboneError, match=r"fails on an example input of shape \(1, 3, 8, 8\) \(Given input size"):
        supermodel("vgg16_bn", [Task("d", "depth")], torch.randn(1, 3, 8, 8))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ShapeProp" not in err, err


# ---------------------------------------------------------------------------------------
# tensor files a run directory holds are data: bounded reads
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, command", [
    ("supermodel.pt", lambda out, tmp: ["compact", out, "--out", tmp / "m.automtl", "--quiet"]),
    ("checkpoints/checkpoint.pt", lambda out, tmp: ["search", "tiny", *SMALL, "--out", out, "--resume"]),
], ids=["compact", "resume"])
def test_a_compressed_tensor_file_in_a_run_directory_is_refused(finished, tmp_path, name, command):
    """torch.load inflates deflated entries (200 KB of deflated zeros load as 200 MB): automtl reads only the
    uncompressed entries torch.save writes, so what a file builds fits in the file."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    deflate(out / name)
    before = snapshot(out)
    one_line_error(cli(*command(out, tmp_path)), "compressed", name.rsplit("/", 1)[-1])
    assert snapshot(out) == before and not (tmp_path / "m.automtl").exists()


def test_a_tensor_file_whose_zip_readers_disagree_is_refused(tmp_path):
    """torch.load's zip reader (miniz) and Python's, which checked that every entry is stored, read two directories of
    one file as two archives: a 1 MB file checked as stored entries loaded as 1 GB of inflated zeros. Refused now,
    as is a torch.save file (which always ends with zip64 records) whose plain end record names another directory."""
    import struct

    from automtl.errors import ConfigError
    from automtl.fileio import load_tensors
    from conftest import deflated_as_stored, two_directories

    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2**20)}, path)  # 4 MB of zeros
    saved = path.read_bytes()
    deflate(path)
    path.write_bytes(two_directories(path.read_bytes(), deflated_as_stored))
    assert path.stat().st_size < 100_000
    with pytest.raises(ConfigError, match="zip readers differ"):
        load_tensors(path, "weights", ConfigError, "save them again")
    eocd = len(saved) - 22
    assert saved[eocd - 20:eocd - 16] == b"PK\x06\x07"
    other = bytearray(saved)
    struct.pack_into("<I", other, eocd + 16, struct.unpack("<I", saved[eocd + 16:eocd + 20])[0] + 4)
    path.write_bytes(bytes(other))
    with pytest.raises(ConfigError, match="disagree"):
        load_tensors(path, "weights", ConfigError, "save them again")
    path.write_bytes(saved)
    assert torch.equal(load_tensors(path, "weights", ConfigError, "save them again")["w"], torch.zeros(2**20))


def test_json_read_back_nesting_deeper_than_automtl_writes_is_one_sentence(tmp_path):
    """A sweep member's report.json nesting 600 levels parsed (json's limit is about 1000), then the config rebuilt
    from it recursed past Python's limit: a RecursionError traceback from ``sweep --resume``."""
    deep: dict = {}
    inner = deep
    for _ in range(600):
        inner["a"] = {}
        inner = inner["a"]
    member = tmp_path / "sweep" / "budget-1.0x"
    member.mkdir(parents=True)
    (member / "model.automtl").write_bytes(b"x")
    (member / "report.json").write_text(json.dumps({"config": {"backbone": "tiny", "search": {"weighting_options": deep}},
                                                    "policy": {"counts": {}}}))
    one_line_error(cli("sweep", "tiny", "--budgets", "1.0x", *SMALL, "--out", tmp_path / "sweep", "--resume"),
                   "report.json' nests more than 32 levels deep")
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(deep) + "\n" + json.dumps({"step": 1}) + "\n")
    from automtl.fileio import iter_json_lines

    assert [value for _, _, value in iter_json_lines(log, "log", AutomtlError)] == [None, {"step": 1}]
