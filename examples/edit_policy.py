"""Edit a policy by hand and re-compact: share the first layers for every task, then compile.

    python examples/edit_policy.py RUN_DIR [--share-first 4] [--finetune-steps 50]

RUN_DIR is what `automtl search ... --out RUN_DIR` wrote (supermodel.yaml, supermodel.pt,
policy.yaml). The script rewrites policy.yaml the way a person would in an editor, saves it as
policy-edited.yaml, fine-tunes that architecture briefly and writes model-edited.automtl.
"""
import argparse
from pathlib import Path

import yaml

import automtl
from automtl.convert import build_data
from automtl.runs import load_run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--share-first", type=int, default=4, help="make the first N layers shared by every task")
    ap.add_argument("--finetune-steps", type=int, default=50)
    args = ap.parse_args(argv)
    run = Path(args.run_dir)

    # 1. Edit the YAML as text data: layer -> task -> share | specialize | skip.
    doc = yaml.safe_load((run / "policy.yaml").read_text())
    for layer in list(doc["layers"])[: args.share_first]:
        doc["layers"][layer] = {task: "share" for task in doc["tasks"]}
    edited = run / "policy-edited.yaml"
    edited.write_text(yaml.safe_dump(doc, sort_keys=False))

    # 2. Feed it back: fine-tune only that architecture, then compile it.
    sm, cfg, _ = load_run(run)
    policy = automtl.Policy.load(edited)
    train, val = build_data(cfg, sm.tasks)
    config = cfg.search.replace(finetune_steps=args.finetune_steps, out_dir=None, quiet=True)
    result = automtl.search(sm, train, val, config, policy=policy)
    model = automtl.compact(sm, policy)
    automtl.save(model, run / "model-edited.automtl")
    print("edited policy:", policy.counts(), "->", f"{model.num_parameters():,} parameters")
    print("metrics:", {t: round(m[next(iter(m))], 3) for t, m in result.metrics.items()})


if __name__ == "__main__":
    main()
