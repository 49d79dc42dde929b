"""Every benchmark script runs end to end at the smallest sizes and writes what it promises.

The figures themselves are measured by hand (benchmarks/README.md); these runs only keep the
scripts from rotting: a script that no longer runs would silently keep stale results."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(script, *args, timeout=300):
    proc = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_search_step_measures_batched_and_per_task_loop(tmp_path):
    out = tmp_path / "search_step.json"
    run("search_step.py", "--backbones", "tiny", "--sizes", "32", "--repeats", "1", "--warmup", "0", "--tasks", "2", "--out", out)
    res = json.loads(out.read_text())["results"][0]
    assert res["tasks"] == 2
    for label in ("default", "soft", "conflict", "per_task_loop"):
        assert res["variants"][label]["wall"]["ratio"] > 0
    assert res["variants"]["default"]["cpu"]["speedup_vs_per_task_loop"] > 0


def test_scaling_writes_a_row_per_task_count(tmp_path):
    run("scaling.py", "--backbone", "tiny", "--size", "32", "--tasks", "2", "3", "--repeats", "1", "--warmup", "0", "--out", tmp_path)
    rows = json.loads((tmp_path / "scaling.json").read_text())["rows"]
    assert [r["wall"]["tasks"] for r in rows] == [2, 3]
    assert all(r["cpu"]["separate"] > 0 and r["cpu"]["search_step"] > 0 for r in rows)
    table = (tmp_path / "scaling.md").read_text()
    assert "| 2 |" in table and "| 3 |" in table


def test_quality_quick_run_on_multifashion(tmp_path):
    run("quality.py", "--quick", "--only", "small_resnet", "--jobs", "1", "--out", tmp_path)
    data = json.loads((tmp_path / "quality.json").read_text())
    assert data["complete"] is True
    res = data["results"]["multifashion/small_resnet"]
    found = {f"{s}@{b}" for s in ("conflict", "gumbel") for b in ("1.5x", "2.0x")}
    assert set(res["summary"]) == ({"single-task", "hard-sharing", "hard-sharing (cosine over C)", "random@1.5x"} | found
                                   | {f"{f} retrained" for f in found})
    # every row reports its cost in backbone forward+backward equivalents, and the curves are kept
    assert all(s["fbe"] > 0 for s in res["summary"].values())
    jobs = data["jobs"]["multifashion/small_resnet"]
    assert jobs["hard-sharing/0"]["curve"] and "conflict@1.5x" in (tmp_path / "quality.md").read_text()
    assert "curve" not in jobs["hard-sharing (cosine over C)/0"]  # the cost unit: no validation passes
    # the control is sized like the default strategy's 1.5x architecture; retrained rows keep the size
    assert jobs["random@1.5x/0"]["parameters"] > 0
    assert jobs["conflict@1.5x retrained/0"]["parameters"] == jobs["conflict@1.5x/0"]["parameters"]


def test_quality_pairs_each_row_with_the_same_seeds_hard_sharing():
    sys.path.insert(0, str(BENCH))
    import quality

    def job(left=None, right=None):
        metrics = {t: {"accuracy": v} for t, v in (("left", left), ("right", right)) if v is not None}
        return {"metrics": metrics, "parameters": 1, "policy": None,
                "cpu_seconds": 10.0, "seconds": 1.0, "cpu_per_step": 1.0}

    done = {}
    for seed, (hard, conv) in enumerate([(60.0, 63.0), (50.0, 49.0), (70.0, 70.0)]):
        done.update({f"single:left/{seed}": job(left=50.0), f"single:right/{seed}": job(right=50.0),
                     f"hard-sharing (cosine over C)/{seed}": job(50.0, 50.0), f"hard-sharing/{seed}": job(hard, 50.0),
                     f"conflict@1.5x/{seed}": job(conv, 50.0)})
    summary = quality.summarize(quality.BENCHMARKS["multifashion/small_resnet"], [0, 1, 2], done)["summary"]
    vs = summary["conflict@1.5x"]["vs_hard_sharing"]
    # Δ_MTL moves by half the left accuracy's relative change (two metrics): +3, -1, 0 points of 50
    assert [round(v, 6) for v in vs["per_seed"].values()] == [3.0, -1.0, 0.0]
    assert abs(vs["mean"] - 2 / 3) < 1e-9 and abs(vs["se"] - statistics.stdev([3, -1, 0]) / 3 ** 0.5) < 1e-9
    assert summary["hard-sharing"]["vs_hard_sharing"] is None and "| +0.67 ± 1.20 (3) |" in quality.markdown(
        {"multifashion/small_resnet": {"benchmark": quality.BENCHMARKS["multifashion/small_resnet"], "per_seed": {0: 0, 1: 0, 2: 0},
                                       "summary": summary}})
    del done["hard-sharing/2"]  # a seed without hard sharing: the pairs are over the other two, and say so
    vs = quality.summarize(quality.BENCHMARKS["multifashion/small_resnet"], [0, 1, 2], done)["summary"]["conflict@1.5x"]
    assert vs["seeds"] == 3 and vs["vs_hard_sharing"]["seeds"] == 2 and vs["vs_hard_sharing"]["mean"] == 1.0


def test_quality_runs_only_the_rows_asked_for(tmp_path):
    run("quality.py", "--quick", "--only", "small_resnet", "--jobs", "1", "--rows", " conflict@1.5x retrained", "--out", tmp_path)
    jobs = json.loads((tmp_path / "quality.json").read_text())["jobs"]["multifashion/small_resnet"]
    # the single-task models, the cost unit and hard sharing always run (every Δ_MTL, FBE figure and paired
    # difference needs them), and a retrained row brings the search it retrains
    assert set(jobs) == {"single:left/0", "single:right/0", "hard-sharing (cosine over C)/0", "hard-sharing/0",
                         "conflict@1.5x/0", "conflict@1.5x retrained/0"}
    for args, needle in ((["--rows", "conflict@9x", "--out", tmp_path], "no row named conflict@9x"),
                         (["--rows", "conflict@1.5x"], "--rows runs part of the benchmark")):
        proc = subprocess.run([sys.executable, str(BENCH / "quality.py"), "--quick", *map(str, args)],
                              capture_output=True, text=True, env=ENV, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr

def test_memory_reports_the_cases_asked_for_against_their_baselines(tmp_path):
    """Each case in a process of its own (the command-line default is all nine; three, and the two baselines
    their ratios need, are measured here)."""
    run("memory.py", "--backbones", "tiny", "--size", "32", "--steps", "1", "--out", tmp_path / "memory.json",
        "--cases", "search/batched,search/per_task_loop,infer/compact/random")
    rows = json.loads((tmp_path / "memory.json").read_text())["results"]
    cases = {r["case"]: r for r in rows}
    assert set(cases) == {"train/backbone", "infer/backbone", "search/batched", "search/per_task_loop", "infer/compact/random"}
    assert cases["infer/backbone"]["total_ratio"] == 1.0 and cases["infer/compact/random"]["total_ratio"] > 0
    assert cases["train/backbone"]["total_ratio"] == 1.0 and cases["search/batched"]["held_mib"] > cases["train/backbone"]["held_mib"]


def test_summary_renders_the_committed_results_into_a_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- benchmarks:start -->\nold tables\n<!-- benchmarks:end -->\noutro\n")
    run("summary.py", "--out", tmp_path / "summary.md", "--readme", readme)
    text = (tmp_path / "summary.md").read_text()
    assert "**One search step**" in text and "**All-task inference**" in text and "Δ_MTL" in text
    spliced = readme.read_text()
    assert spliced.startswith("intro\n<!-- benchmarks:start -->\n**") and spliced.endswith("<!-- benchmarks:end -->\noutro\n")
    assert "old tables" not in spliced and text in spliced


def test_grouped_copies_writes_a_ratio_per_layer(tmp_path):
    out = tmp_path / "grouped.json"
    run("grouped_copies.py", "--repeats", "1", "--tasks", "2", "--out", out)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 3 and all(r["grouped_over_separate"] > 0 for r in rows)


def test_stage_cost_reports_every_stage_in_warmup_steps(tmp_path):
    out = tmp_path / "stage_cost.json"
    run("stage_cost.py", "--backbones", "tiny", "--size", "32", "--steps", "4", "--strategies", "conflict", "--out", out)
    row = json.loads(out.read_text())["results"][0]
    assert row["strategy"] == "conflict" and row["fbe"]["warmup"] == 1.0
    assert set(row["fbe"]) == {"warmup", "search", "finetune"} and all(v > 0 for v in row["fbe"].values())


def test_futility_replay_finds_the_stop_of_every_grid_point(tmp_path):
    out = tmp_path / "futility_replay.json"
    run("futility_replay.py", "--only", "tiny", "--seeds", "0", "--steps", "12", "--size", "32",
        "--futility", "0.05", "0.2", "--minimum", "4", "--threshold", "0", "-0.5", "--out", out)
    rows = json.loads(out.read_text())["results"]
    assert [(r["futility"], r["threshold"]) for r in rows] == [(0.05, 0.0), (0.05, -0.5), (0.2, 0.0), (0.2, -0.5)]
    assert all(4 <= r["stop"] <= r["planned"] == 12 and isinstance(r["same_decision"], bool) for r in rows)
    for r in rows:  # the pairs open at the look before the stop are in the layers it names
        assert sorted({p["layer"] for p in r["last_open_pairs"]}) == r["last_open_layers"]
    # a margin of 0.5 in cosine: no pair of a tiny run conflicts that much, so it stops at the first check
    assert all(r["stop"] == 4 for r in rows if r["threshold"] == -0.5)


def test_futility_replay_measures_part_of_the_batch_without_training_on_it(tmp_path):
    """--fraction: the cosines of the per-task gradients on part of each measured batch are recorded beside
    the full batch's; taking them trains nothing, so every weight and norm statistic is the full-batch run's."""
    sys.path.insert(0, str(BENCH))
    import futility_replay

    def go(fractions):
        strategy, cos = futility_replay.record("tiny", 0, steps=6, size=32, fractions=fractions)
        return {k: v.clone() for k, v in strategy.run.sm.state_dict().items()}, cos

    plain, only = go(())
    part, both = go((0.5, 0.99))
    assert set(only) == {1.0} and set(both) == {1.0, 0.5, 0.99}
    assert torch.equal(both[1.0], only[1.0]) and both[0.5].shape == both[1.0].shape
    # 0.99 of 4 samples is all 4: the same weights and samples as the step's own measurement
    assert torch.allclose(both[0.99], both[1.0], atol=1e-4), (both[0.99] - both[1.0]).abs().max()
    assert not torch.allclose(both[0.5], both[1.0], atol=1e-2)  # 2 of 4 samples: other gradients
    assert any("running_mean" in k for k in plain) and plain.keys() == part.keys()
    assert all(torch.equal(plain[k], part[k]) for k in plain)
    out = tmp_path / "fraction.json"
    run("futility_replay.py", "--only", "tiny", "--seeds", "0", "--steps", "8", "--size", "32", "--fraction", "1", "0.5",
        "--futility", "0.05", "--minimum", "4", "--out", out)
    rows = json.loads(out.read_text())["results"]
    assert [(r["fraction"], r["samples"]) for r in rows] == [(1.0, 4), (0.5, 2)]
    assert "same_branches_as_full_batch" in rows[1] and "same_branches_as_full_batch" not in rows[0]


def test_branch_oracle_trains_each_architecture_like_the_quality_rows(tmp_path):
    """The oracle's all-share row is trained exactly as quality.py's hard-sharing (cosine over C) row: its
    metrics must come out bitwise the same, and each named architecture gets a paired difference."""
    run("quality.py", "--quick", "--only", "resnet18", "--jobs", "1", "--rows", "conflict@1.5x", "--out", tmp_path)
    out = tmp_path / "oracle.json"
    run("branch_oracle.py", "--quick", "--bench", "synthetic/resnet18", "--only", "segmentation owns layer4.1",
        "--jobs", "1", "--quality", tmp_path / "quality.json", "--out", out)
    result = json.loads(out.read_text())
    assert result["all_share_reproduces_quality"] is True
    assert set(result["summary"]) == {"all-share", "segmentation owns layer4.1"}
    assert result["summary"]["all-share"]["vs_all_share"] == 0.0
    assert result["architectures"]["segmentation owns layer4.1"]["parameters_vs_all_share"] > 1.0


def test_capacity_probe_judges_every_trial_copy_and_leaves_the_ordinary_run_as_it_was(tmp_path):
    """Trial copies train beside the conflict search without changing it: the same conflict scores bitwise as
    the run without them, and a held-out gain with its standard error for every trial layer and task."""
    out = tmp_path / "probe.json"
    run("capacity_probe.py", "--quick", "--bench", "synthetic/resnet18", "--seeds", "0", "--layers", "2",
        "--held-out", "16", "--control", "--jobs", "1", "--out", out)
    (result,) = json.loads(out.read_text())["results"]
    assert result["ordinary_run_unchanged"] is True
    assert len(result["gains"]) == 2
    for per_task in result["gains"].values():
        assert set(per_task) == {"segmentation", "depth", "normal"}
        assert all(g["se"] > 0 and abs(g["relative_gain"]) < 10 for g in per_task.values())
    assert 0 < result["trial_cpu_seconds"] < result["cpu_seconds"]


def test_measurement_cost_finds_convert_s_all_share_run_to_be_hard_sharing_at_its_steps(tmp_path):
    """benchmarks/measurement_cost.py on the quick scenes: where conflict keeps every layer shared, hard sharing
    trained for the same steps with the same anneal has bitwise its metrics (a difference of exactly 0)."""
    run("quality.py", "--quick", "--only", "resnet18", "--jobs", "1", "--rows", "hard-sharing", "--out", tmp_path)
    run("measurement_cost.py", "--quick", "--only", "resnet18", "--seeds", "1", "--jobs", "1",
        "--singles", tmp_path / "quality.json", "--out", tmp_path / "mc.json")
    result = json.loads((tmp_path / "mc.json").read_text())
    jobs = result["jobs"]
    assert sum(jobs["conflict@1.5x/0"]["steps"]) == sum(jobs["hard-sharing@conflict/0"]["steps"])
    assert jobs["conflict@1.5x/0"]["policy"]["specialize"] == 0  # conflict keeps every layer shared here
    assert jobs["conflict@1.5x/0"]["metrics"] == jobs["hard-sharing@conflict/0"]["metrics"]
    assert result["conflict - hard-sharing@conflict"]["mean"] == 0.0
