"""automtl plot: PNGs of a run's log (skipped without matplotlib)."""
import json
import math

import pytest
from click.testing import CliRunner

from automtl.cli import main
from automtl.errors import FileFormatError
from automtl.plot import plot_run, read_log

LAYERS = ["conv1", "layer1_0_conv1", "layer1_0_conv2"]
TASKS = ["segment", "depth"]


def _write_log(run, with_policy=True):
    recs = []
    for step in range(1, 31):
        stage = "warmup" if step <= 10 else "search" if step <= 20 else "finetune"
        rec = {"stage": stage, "step": step, "kind": "policy" if stage == "search" and step % 2 else "weight",
               "losses": {t: 1.0 / step + k for k, t in enumerate(TASKS)}, "total": 1.0,
               "tau": 5.0 * 0.9 ** (step - 10) if stage == "search" else None}
        if stage == "search":
            rec["expected_params"] = 1e5 - 100 * step
            if with_policy:
                p = min(0.9, 0.33 + step / 40)
                rec["policy_probs"] = {t: {layer: [p, (1 - p) / 2, (1 - p) / 2] for layer in LAYERS} for t in TASKS}
        recs.append(rec)
        if step % 10 == 0:
            recs.append({"stage": "val", "step": step, "during": stage, "losses": {},
                         "metrics": {"segment": {"miou": step, "pixel_acc": 2 * step}, "depth": {"abs_err": 1 / step}}})
    (run / "checkpoints").mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"stage": "warm'  # a line cut by a killed run
    (run / "checkpoints" / "log.jsonl").write_text(text)


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_writes_losses_metrics_and_policy(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'automtl[plot]')")
    _write_log(tmp_path)
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["losses.png", "metrics.png", "policy.png"]
    assert all(p.parent == tmp_path / "plots" and _is_png(p) for p in paths)


def test_plot_without_policy_records_skips_the_policy_figure(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'automtl[plot]')")
    _write_log(tmp_path, with_policy=False)
    result = CliRunner().invoke(main, ["plot", str(tmp_path), "--out", str(tmp_path / "pics")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["losses.png", "metrics.png"]


def test_plot_into_a_folder_under_a_file_is_one_sentence(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'automtl[plot]')")
    _write_log(tmp_path)
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(main, ["plot", str(tmp_path), "--out", str(tmp_path / "file" / "pics")])
    assert result.exit_code == 2 and f"{str(tmp_path / 'file')!r} is a file, not a folder" in result.output
    assert "Traceback" not in result.output


def test_plot_of_a_directory_without_a_log_is_one_sentence(tmp_path):
    result = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "holds no checkpoints/log.jsonl" in result.output


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    import sys

    _write_log(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    result = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "pip install 'automtl[plot]'" in result.output


def test_read_log_skips_a_cut_line(tmp_path):
    _write_log(tmp_path)
    recs = read_log(tmp_path)
    assert all(math.isfinite(r["step"]) for r in recs)
    assert sum("policy_probs" not in r for r in recs) == 33 and sum("policy_probs" in r for r in recs) == 10


def test_plot_of_a_real_search_run(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'automtl[plot]')")
    result = CliRunner().invoke(main, ["search", "tiny", "--steps", "2,2,2", "--samples", "8,4", "--input-size", "32",
                                       "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in plot_run(tmp_path)} >= {"losses.png", "metrics.png"}


# ---- the log is data: bounded, and its records checked against what the figures draw -------------------------
def _log(run, lines):
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "log.jsonl").write_bytes(b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines))


GOOD = {"stage": "warmup", "step": 1, "kind": "weight", "losses": {"segment": 0.5}}


@pytest.mark.parametrize("bad, says", [
    ({"losses": ["segment", 0.5]}, "'losses' that is not a mapping"),
    ({"losses": {"segment": "0.5"}}, "a loss of 'segment' that is not a number"),
    ({"losses": {"segment": True}}, "a loss of 'segment' that is not a number"),
    ({"stage": ["warmup"]}, "a stage name that is not printable text"),
    ({"stage": "x" * 300}, "a stage name that is not printable text of 1 to 256 characters"),
    ({"losses": {"$\\foo$": 1.0}}, "a task name that is not printable text of 1 to 256 characters without '$'"),
    ({"losses": {"\ud800": 1.0}}, "a task name that is not printable"),
    ({"stage": "val", "metrics": {"segment": {"$\\frac{$": 1.0}}}, "a metric name that is not printable"),
    ({"policy_probs": {"segment": {"a\nb": [0.2, 0.3, 0.5]}}}, "a layer name that is not printable"),
    ({"tau": {"a": 1}}, "'tau' that is not a number"),
    ({"stage": "val", "metrics": {"segment": [1, 2]}}, "metrics of 'segment' that is not a mapping"),
    ({"policy_probs": {"segment": {"conv1": [0.5, 0.5]}}}, "a policy_probs row that is not a list of 3 numbers"),
    ({"policy_probs": {"segment": "conv1"}}, "policy_probs of 'segment' that is not a mapping"),
    ({"losses": {f"task{k}": 1.0 for k in range(33)}}, "more than 32 distinct task names"),
])
def test_a_record_of_another_shape_is_one_sentence_with_its_line(tmp_path, bad, says):
    _log(tmp_path, [GOOD, dict(GOOD, step=2, **bad)])
    result = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "line 2 of log" in result.output and says in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "plots").exists()


def test_lines_nested_too_deep_or_too_long_are_skipped_as_unreadable(tmp_path, monkeypatch):
    import automtl.fileio as fileio

    monkeypatch.setattr(fileio, "MAX_LOG_LINE_BYTES", 1000)
    long = json.dumps(dict(GOOD, step=3, note="x" * 5000)).encode()
    _log(tmp_path, [GOOD, b"[" * 100_000 + b"]" * 100_000, long, b'{"step": 1' + b"9" * 5000 + b"}",
                    dict(GOOD, step=4)])
    recs = read_log(tmp_path)
    assert [r["step"] for r in recs] == [1, 4]


def test_only_the_fields_the_figures_draw_are_kept(tmp_path):
    _log(tmp_path, [dict(GOOD, weights={"a": [1] * 10}, anything="else")])
    (rec,) = read_log(tmp_path)
    assert set(rec) == {"line", "step", "stage", "kind", "losses", "tau", "expected_params", "expected_macs"}


def test_numbers_beyond_what_can_be_drawn_are_missing_and_steps_beyond_are_skipped(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'automtl[plot]')")
    huge = int("1" + "0" * 400)
    _log(tmp_path, [GOOD, dict(GOOD, step=2, losses={"segment": huge}, tau=1e308),
                    dict(GOOD, step=8e307), dict(GOOD, step=-8e307), dict(GOOD, step=huge),
                    {"stage": "val", "step": 3, "metrics": {"segment": {"miou": -1e308}}},
                    dict(GOOD, step=4, stage="search", policy_probs={"segment": {"conv1": [huge, 0.5, None]}})])
    recs = read_log(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 4]
    assert recs[1]["losses"] == {"segment": None} and recs[1]["tau"] is None
    assert recs[2]["metrics"] == {"segment": {"miou": None}}
    assert {p.name for p in plot_run(tmp_path)} == {"losses.png", "metrics.png", "policy.png"}


def test_empty_policy_records_draw_no_policy_figure(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'automtl[plot]')")
    _log(tmp_path, [dict(GOOD, policy_probs={}), dict(GOOD, step=2, policy_probs={"segment": {}}),
                    dict(GOOD, step=3, policy_probs={"segment": None})])
    assert [p.name for p in plot_run(tmp_path)] == ["losses.png"]


def test_links_in_the_run_directory_are_not_followed(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'automtl[plot]')")
    import os

    victim = tmp_path / "victim"
    victim.write_text("keep me")
    run = tmp_path / "run"
    _log(run, [GOOD, dict(GOOD, step=2)])
    (run / "plots").mkdir()
    os.symlink(victim, run / "plots" / "losses.png")
    plot_run(run)
    assert victim.read_text() == "keep me" and _is_png(run / "plots" / "losses.png")
    assert not (run / "plots" / "losses.png").is_symlink()
    other = tmp_path / "run2"
    _log(other, [GOOD])
    os.symlink(tmp_path / "elsewhere", other / "plots")
    result = CliRunner().invoke(main, ["plot", str(other)])
    assert result.exit_code == 2 and "symbolic link" in result.output and not (tmp_path / "elsewhere").exists()


def test_a_long_log_is_thinned_evenly(tmp_path):
    import automtl.plot as plot

    n = plot.MAX_RECORDS * 2 + 7
    _log(tmp_path, [dict(GOOD, step=s) for s in range(n)] + [{"stage": "val", "step": n, "metrics": {}}])
    recs = read_log(tmp_path)
    steps = [r["step"] for r in recs if r["stage"] != "val"]
    assert plot.MAX_RECORDS // 2 <= len(steps) <= plot.MAX_RECORDS and steps[0] == 0
    assert len(set(b - a for a, b in zip(steps, steps[1:]))) == 1  # evenly
    assert recs[-1]["stage"] == "val"


def test_a_log_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    import os

    (tmp_path / "checkpoints").mkdir()
    os.mkfifo(tmp_path / "checkpoints" / "log.jsonl")
    result = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "not a regular file" in result.output, result.output


def test_a_log_larger_than_automtl_reads_is_one_sentence(tmp_path, monkeypatch):
    import automtl.fileio as fileio

    _log(tmp_path, [GOOD] * 100)
    monkeypatch.setattr(fileio, "MAX_LOG_BYTES", 1000)
    with pytest.raises(FileFormatError, match="more than the 1000 automtl reads"):
        read_log(tmp_path)


def test_the_policy_figure_of_many_layers_and_steps_stays_bounded(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'automtl[plot]')")
    import automtl.plot as plot

    layers = [f"l{k}" for k in range(plot.MAX_LAYERS)]
    tasks = [f"t{k}" for k in range(4)]
    probs = {t: {layer: [0.2, 0.3, 0.5] for layer in layers} for t in tasks}
    _log(tmp_path, [dict(GOOD, step=s, policy_probs=probs) for s in range(1, 4)])
    recs = [r for r in read_log(tmp_path) if "policy_probs" in r]
    fig = plot._policy_figure(__import__("matplotlib.figure").figure.Figure, recs)
    assert fig.get_size_inches()[1] <= plot.MAX_FIGURE_INCHES


def test_a_figure_that_cannot_be_written_leaves_none_of_them(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'automtl[plot]')")
    _write_log(tmp_path)
    (tmp_path / "plots" / "policy.png").mkdir(parents=True)
    result = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "policy.png' is a folder" in result.output, result.output
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["policy.png"]


@pytest.mark.parametrize("given", ["run", "run/checkpoints", "run/checkpoints/log.jsonl"])
def test_the_figures_go_beside_checkpoints_whichever_path_names_the_run(tmp_path, given):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'automtl[plot]')")
    _write_log(tmp_path / "run")
    paths = plot_run(tmp_path / given)
    assert {p.parent for p in paths} == {tmp_path / "run" / "plots"}
