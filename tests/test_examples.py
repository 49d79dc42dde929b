"""Each script in examples/ runs, at small sizes, as a user would run it."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args, cwd, timeout=600, quiet=False):
    """The script's stdout; ``quiet``: its stderr holds no warning either."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert not quiet or "Warning" not in proc.stderr, proc.stderr[-4000:]
    return proc.stdout


def test_custom_tasks_and_load_pt2(tmp_path):
    out = run(ROOT / "examples" / "custom_tasks.py", "--steps", "2,4,2", "--samples", "32", "--size", "32",
              "--out", tmp_path / "custom", cwd=tmp_path)
    assert "edges" in out and "compact model" in out
    shapes = run(ROOT / "examples" / "load_pt2.py", tmp_path / "custom" / "model.pt2", cwd=tmp_path)
    assert "segmentation: (4, 4, 32, 32)" in shapes and "edges:" in shapes


def test_edit_policy(tmp_path):
    run_dir = tmp_path / "run"
    exe = Path(sys.executable).parent / "automtl"
    subprocess.run([str(exe), "search", "tiny", "--steps", "2,4,2", "--samples", "16,8", "--input-size", "32",
                    "--quiet", "--out", str(run_dir)], check=True, env=ENV)
    out = run(ROOT / "examples" / "edit_policy.py", run_dir, "--share-first", "3", "--finetune-steps", "2", cwd=tmp_path)
    assert "edited policy" in out
    assert (run_dir / "model-edited.automtl").exists()
    import automtl

    policy = automtl.Policy.load(run_dir / "policy-edited.yaml")
    assert all(c == 0 for row in policy.choices[:3] for c in row)


def test_torchrun_search(tmp_path):
    out = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", ROOT / "examples" / "torchrun_search.py", "--steps", "2,4,2",
              "--out", tmp_path / "ddp", cwd=tmp_path, quiet=True)  # its defaults give gumbel its held-out split
    assert "policy:" in out
    assert (tmp_path / "ddp" / "policy.yaml").exists()
