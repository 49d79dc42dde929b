"""automtl sweep: one convert per budget beside equal-compute baselines, sweep.json and sweep.png."""
import json
import math
import sys

import pytest
from click.testing import CliRunner

from automtl.cli import main
from automtl.errors import ConfigError
from automtl.protocol import run_cost
from automtl.sweep import pareto_front, parse_budgets

TINY = ["tiny", "--budgets", "1.0x,1.5x", "--steps", "2,2,2", "--samples", "16,8", "--input-size", "16", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A tiny sweep run once for the module (a few seconds): its folder."""
    out = tmp_path_factory.mktemp("sweep")
    result = invoke("sweep", *TINY, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_pareto_front_on_hand_made_points():
    points = [(1.0, 0.0),            # front: the cheapest point with score 0
              (2.0, 5.0),            # front
              (2.0, 3.0),            # hidden by (2, 5): same cost, lower score
              (3.0, 5.0),            # hidden by (2, 5): dearer, same score
              (0.5, -10.0),          # front: the cheapest of all
              (1.0, 0.0),            # front: equal to the first, neither hides the other
              (None, 100.0),         # never on the front, hides nothing
              (4.0, float("nan")),   # never on the front
              (5.0, 6.0)]            # front: the best score
    assert pareto_front(points) == [True, True, False, False, True, True, False, False, True]
    assert pareto_front([]) == []


def test_parse_budgets_keeps_order_and_labels():
    assert parse_budgets("1.0x, 1.5x,2") == [("1.0x", 1.0), ("1.5x", 1.5), ("2x", 2.0)]
    assert parse_budgets(["2.0x"]) == [("2.0x", 2.0)]
    for bad in ("", "1.0x,,2.0x", "abc", "1x,1.0x", "none", "-1x"):
        with pytest.raises(ConfigError):
            parse_budgets(bad)


@pytest.mark.parametrize("budgets", ["1.0x,abc", "1x,1.0x", ",", "0x"])
def test_bad_budgets_exit_2_with_one_sentence(budgets, tmp_path):
    result = invoke("sweep", "tiny", "--budgets", budgets, "--out", tmp_path / "s")
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1 and "--budgets" in result.output
    assert not (tmp_path / "s").exists()


def test_sweep_writes_rows_for_every_budget_and_baseline(swept):
    data = json.loads((swept / "sweep.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["conflict@1.0x", "conflict@1.5x", "hard-sharing", "single-task"]
    assert [rows[n]["budget"] for n in rows] == ["1.0x", "1.5x", None, None]
    tasks = [t["name"] for t in data["tasks"]]
    for r in data["rows"]:
        for key in ("params", "macs", "latency_ms", "params_vs_hard_sharing"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (r["name"], key)
        assert isinstance(r["delta_mtl"], float) and math.isfinite(r["delta_mtl"]), r["name"]
        assert sorted(r["metrics"]) == sorted(tasks)
        assert all(math.isfinite(v) for m in r["metrics"].values() for v in m.values())
    assert rows["single-task"]["delta_mtl"] == 0.0
    assert data["delta_metrics"] == {"segmentation": ["miou", "pixel_acc"], "depth": ["abs_err", "rel_err"],
                                     "normal": ["mean_angle", "median_angle"]}
    assert [m["name"] for m in rows["single-task"]["members"]] == [f"single-{t}" for t in tasks]
    assert rows["hard-sharing"]["params"] == rows["conflict@1.0x"]["params"]  # 1.0x leaves no room to branch
    assert rows["single-task"]["params"] > rows["hard-sharing"]["params"]
    fbe = run_cost("conflict", 2, 2, 2, len(tasks), 4)  # the sweep's tasks, conflict_every's default
    assert data["compute"]["fbe_per_run"] == pytest.approx(fbe) and data["compute"]["baseline_steps"] == round(fbe)
    for cost, key in (("params", "params"), ("latency", "latency_ms")):
        assert [r[f"pareto_{cost}"] for r in data["rows"]] == pareto_front([(r[key], r["delta_mtl"]) for r in data["rows"]])
    for d in ("budget-1.0x", "budget-1.5x", "hard-sharing", "single-segmentation", "single-depth", "single-normal"):
        assert (swept / d / "model.automtl").stat().st_size > 0


def test_sweep_png_is_written(swept):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'automtl[plot]')")
    assert (swept / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (swept / "sweep.png").stat().st_size > 10_000


def test_a_second_sweep_is_refused_and_resume_keeps_the_runs(swept):
    again = invoke("sweep", *TINY, "--out", swept)
    assert again.exit_code == 2 and "--resume" in again.output and "--overwrite" in again.output
    before = (swept / "budget-1.5x" / "model.automtl").stat().st_mtime_ns
    resumed = invoke("sweep", *TINY, "--out", swept, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (swept / "budget-1.5x" / "model.automtl").stat().st_mtime_ns == before
    other = invoke("sweep", *TINY, "--steps", "2,2,3", "--out", swept, "--resume")
    assert other.exit_code == 2 and "another configuration" in other.output


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != ".automtl.lock"}


def test_an_overwrite_that_fails_before_changing_a_run_keeps_the_earlier_sweep(swept, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(swept, out)
    before = _files(out)
    assert "sweep.json" in before
    failed = invoke("sweep", *TINY[:2], "1.0x,0.01x", *TINY[3:], "--out", out, "--overwrite")  # found when built
    assert failed.exit_code == 2 and "--budgets" in failed.output, failed.output
    assert _files(out) == before
    # a killed overwrite's summary comes back with the next command when no run has changed since ...
    from automtl.sweep import _SetAside

    _SetAside.create(out, {})
    assert not (out / "sweep.json").exists()
    assert invoke("sweep", *TINY, "--out", out).exit_code == 2  # refused: the folder holds a sweep
    assert _files(out) == before
    # ... and is dropped when one has: it no longer describes the folder
    aside = _SetAside.create(out, {})
    (out / "hard-sharing" / "metrics.json").write_text("{}")
    _SetAside(out, aside.folder).settle()
    assert not (out / "sweep.json").exists() and not list(out.glob(".automtl-sweep-replaced-*"))


def test_a_killed_overwrite_is_settled_member_runs_first(swept, tmp_path):
    """Killed while a member run was set aside (before its first checkpoint): the next command puts the member run
    back and then, every run being as it was, the summary too."""
    import shutil

    from automtl.rundir import RunDirectory
    from automtl.sweep import _SetAside

    out = tmp_path / "copy"
    shutil.copytree(swept, out)
    before = _files(out)
    _SetAside.create(out, {})
    member = RunDirectory(out / "budget-1.5x", overwrite=True).__enter__()
    (out / "budget-1.5x" / "checkpoints" / "log.jsonl").write_text("{}\n")  # the new run's first lines
    member._release()  # as when the process is killed: the lock goes, nothing else happens
    assert not (out / "sweep.json").exists() and not (out / "budget-1.5x" / "model.automtl").exists()
    assert invoke("sweep", *TINY, "--out", out).exit_code == 2  # refused: the folder holds a sweep
    assert _files(out) == before


def test_resume_after_an_overwrite_was_stopped_goes_on_replacing(swept, tmp_path, monkeypatch):
    """Ctrl-C in an --overwrite with other options after it replaced some runs: the hint's --resume replaces the
    runs it had not reached (they are the earlier sweep's, of another configuration) instead of refusing them."""
    import shutil

    from automtl import sweep as sweep_module

    out = tmp_path / "copy"
    shutil.copytree(swept, out)
    other = [*TINY[:4], "2,2,3", *TINY[5:]]
    real = sweep_module._Sweep._baseline

    def stop_at_hard_sharing(self, name, *args, **kwargs):
        if name == "hard-sharing":
            raise KeyboardInterrupt
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(sweep_module._Sweep, "_baseline", stop_at_hard_sharing)
    stopped = invoke("sweep", *other, "--out", out, "--overwrite")
    assert stopped.exit_code == 130 and "--resume" in stopped.output and "--overwrite" not in stopped.output, stopped.output
    assert not (out / "sweep.json").exists()  # it no longer describes the folder
    monkeypatch.setattr(sweep_module._Sweep, "_baseline", real)
    assert invoke("sweep", *TINY, "--out", out, "--resume").exit_code == 2  # the old options: refused by name
    # a third command, an --overwrite that fails before it changes a run, leaves the stopped one resumable
    failed = invoke("sweep", *TINY[:2], "1.0x,0.01x", *TINY[3:], "--out", out, "--overwrite")
    assert failed.exit_code == 2 and "--budgets" in failed.output
    resumed = invoke("sweep", *other, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "sweep.json").read_text())["config"]["search"]["finetune_steps"] == 3
    assert not list(out.glob(".automtl-sweep-*"))
    for d in ("hard-sharing", "single-depth"):
        assert json.loads((out / d / "metrics.json").read_text())["config"]["search"]["finetune_steps"] == 3


def test_resume_after_a_same_options_overwrite_was_stopped_replaces_the_runs_it_had_not_reached(
        swept, tmp_path, monkeypatch):
    """Same options (a code fix, new weights): the earlier runs look finished, yet they are the old sweep's."""
    import shutil
    import time

    from automtl import sweep as sweep_module

    out = tmp_path / "copy"
    shutil.copytree(swept, out)
    real = sweep_module._Sweep._baseline

    def stop_at_hard_sharing(self, name, *args, **kwargs):
        if name == "hard-sharing":
            raise KeyboardInterrupt
        return real(self, name, *args, **kwargs)

    started = time.time_ns()
    monkeypatch.setattr(sweep_module._Sweep, "_baseline", stop_at_hard_sharing)
    assert invoke("sweep", *TINY, "--out", out, "--overwrite").exit_code == 130
    monkeypatch.setattr(sweep_module._Sweep, "_baseline", real)
    replaced = (out / "budget-1.5x" / "model.automtl").stat().st_mtime_ns
    assert replaced >= started
    assert invoke("sweep", *TINY, "--out", out, "--resume").exit_code == 0
    assert (out / "budget-1.5x" / "model.automtl").stat().st_mtime_ns == replaced  # the overwrite's run, kept
    for d in ("hard-sharing", "single-segmentation"):
        assert (out / d / "model.automtl").stat().st_mtime_ns >= started, d  # the earlier sweep's, replaced


def test_ctrl_c_in_an_overwrite_of_a_new_folder_prints_the_resume_command(tmp_path, monkeypatch):
    from automtl import sweep as sweep_module

    out = tmp_path / "new"
    real = sweep_module._Sweep._baseline

    def stop(self, name, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sweep_module._Sweep, "_baseline", stop)
    stopped = invoke("sweep", *TINY, "--out", out, "--overwrite")
    assert stopped.exit_code == 130 and "continue the sweep with" in stopped.output and "--resume" in stopped.output
    monkeypatch.setattr(sweep_module._Sweep, "_baseline", real)
    assert invoke("sweep", *TINY, "--out", out, "--resume").exit_code == 0
    assert (out / "sweep.json").exists() and not list(out.glob(".automtl-sweep-*"))


def test_ctrl_c_in_an_overwrite_before_any_run_changed_keeps_the_earlier_sweep(swept, tmp_path, monkeypatch):
    import shutil

    from automtl import sweep as sweep_module

    out = tmp_path / "copy"
    shutil.copytree(swept, out)
    before = _files(out)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sweep_module._Sweep, "_convert", stop)
    stopped = invoke("sweep", *TINY, "--out", out, "--overwrite")
    assert stopped.exit_code == 130 and "earlier sweep is as it was" in stopped.output and "--resume" not in stopped.output
    assert _files(out) == before


def test_without_matplotlib_the_json_is_written_and_the_error_names_the_extra(swept, monkeypatch):
    (swept / "sweep.json").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    result = invoke("sweep", *TINY, "--out", swept, "--resume")
    assert result.exit_code == 2
    assert "pip install 'automtl[plot]'" in result.output and result.output.count("\n") == 1
    assert json.loads((swept / "sweep.json").read_text())["rows"]


def test_a_set_aside_sweep_folder_that_is_a_link_moves_nothing_out_of_its_target(tmp_path):
    """A sweep folder holding ``.automtl-sweep-replaced-x`` as a link to another folder whose record matches: entering
    the sweep moved that folder's sweep.json into the sweep (the set-aside summary put back)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "members.json").write_text("{}")
    (victim / "sweep.json").write_text("someone else's file\n")
    out = tmp_path / "sweep"
    out.mkdir()
    (out / ".automtl-sweep-replaced-x").symlink_to(victim)
    invoke("sweep", "tiny", "--budgets", "1.0x", "--steps", "0,0,0", "--samples", "8,4", "--input-size", "8", "--out", out)
    assert (victim / "sweep.json").read_text() == "someone else's file\n"


def test_a_sweep_folder_holding_a_link_to_a_folder_is_refused(tmp_path):
    """A member run's name as a link (``budget-1.0x`` -> another folder) ran that member, its lock, checkpoints and
    --overwrite, in the link's target."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "model.automtl").write_text("someone else's file\n")
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "budget-1.0x").symlink_to(victim)
    result = invoke("sweep", "tiny", "--budgets", "1.0x", "--steps", "0,0,0", "--samples", "8,4", "--input-size", "8",
                    "--out", out, "--overwrite")
    assert result.exit_code == 2 and "holds 'budget-1.0x' as a link to a folder" in result.output
    assert sorted(p.name for p in victim.iterdir()) == ["model.automtl"]


def test_interleaved_latency_times_every_model_in_the_same_rounds():
    from torch import nn

    from automtl.report import interleaved_latency

    models = [nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())]
    models[1].train()
    timings = interleaved_latency(models, (2, 3, 8, 8), repeats=3)
    assert [t["repeats"] for t in timings] == [3, 3]
    assert all(0 < t["latency_min_s"] <= t["latency_s"] for t in timings)
    assert models[1].training  # the mode is restored


@pytest.mark.parametrize("member, content, says", [
    ("budget-1.5x/report.json", b"[" * 100_000, "is not readable JSON"),
    ("budget-1.5x/report.json", b"\xff\xfe not utf-8", "is not readable JSON"),
    ("budget-1.5x/report.json", b'{"config": {}}', "not the report.json automtl writes"),
    ("budget-1.5x/report.json", b'{"config": [], "policy": {"counts": {}}}', "not the report.json automtl writes"),
    ("budget-1.5x/report.json", b'{"config": {}, "policy": []}', "not the report.json automtl writes"),
    ("budget-1.5x/report.json", b'{"config": {}, "policy": {"counts": {"share": "3"}}}', "not the report.json automtl"),
    ("hard-sharing/metrics.json", b'"just a string"', "not the metrics.json automtl writes"),
    ("hard-sharing/metrics.json", b"1" * 5000, "is not readable JSON"),
])
def test_resume_over_a_member_file_automtl_did_not_write_is_one_sentence(swept, tmp_path, member, content, says):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(swept, folder)
    (folder / member).write_bytes(content)
    result = invoke("sweep", *TINY, "--out", folder, "--resume")
    assert result.exit_code == 2, result.output
    assert says in result.output and "--overwrite" in result.output and "Traceback" not in result.output


def test_resume_over_a_member_file_larger_than_automtl_reads_is_one_sentence(swept, tmp_path, monkeypatch):
    import shutil

    import automtl.fileio as fileio

    folder = tmp_path / "copy"
    shutil.copytree(swept, folder)
    monkeypatch.setattr(fileio, "MAX_JSON_BYTES", 100)
    result = invoke("sweep", *TINY, "--out", folder, "--resume")
    assert result.exit_code == 2 and "more than the 100 automtl reads" in result.output, result.output


def test_resume_over_a_member_model_for_other_tasks_is_one_sentence(swept, tmp_path):
    """A kept member's model.automtl is data: one for other tasks (a single-task folder holding the hard-sharing
    model) was measured as that member, or failed inside the evaluation."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(swept, folder)
    single = next(p for p in sorted(folder.iterdir()) if p.name.startswith("single-"))
    shutil.copy(folder / "hard-sharing" / "model.automtl", single / "model.automtl")
    result = invoke("sweep", *TINY, "--out", folder, "--resume")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "is a model for the tasks" in result.output and f"remove the folder {str(single)!r}" in result.output


def test_a_hard_sharing_model_without_parameters_has_no_parameter_ratio(monkeypatch):
    """The ratio to hard sharing's parameters divided by zero for a model without any (a ZeroDivisionError)."""
    from automtl import sweep

    def measured(path, members, expected, *args):
        return [{**m, "params": 0, "macs": 1, "latency_ms": 1.0, "metrics": {t: {"abs_err": 1.0} for t in tasks}}
                for m, tasks in zip(members, expected)]

    monkeypatch.setattr(sweep, "_measure", measured)
    members = [{"name": "hard-sharing", "kind": "hard-sharing", "dirs": ["h"], "train_fbe": 1}]
    singles = [{"name": "single-d", "kind": "single-task", "dirs": ["s"], "train_fbe": 1}]
    rows, _ = sweep._measure_rows(None, members, singles, None, (1, 3, 8, 8), 1, {"d": "depth"}, 1)
    assert [r["params_vs_hard_sharing"] for r in rows] == [None, None]
