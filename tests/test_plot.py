"""automtl plot: PNGs of a run's log (skipped without matplotlib)."""
import json
import math

import pytest
from click.testing import CliRunner

from automtl.cli import main
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
    assert len(recs) == 33 and all(math.isfinite(r["step"]) for r in recs)


def test_plot_of_a_real_search_run(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'automtl[plot]')")
    result = CliRunner().invoke(main, ["search", "tiny", "--steps", "2,2,2", "--samples", "8,4", "--input-size", "32",
                                       "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in plot_run(tmp_path)} >= {"losses.png", "metrics.png"}
