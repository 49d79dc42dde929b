#!/usr/bin/env bash
# Set up automtl on a fresh Debian/Ubuntu machine: Debian's graphviz (the `dot` program) and
# Fashion-MNIST files, a virtualenv in .venv, the CPU build of torch, then the package itself with
# its test, plot, tensorboard and torchjd extras (and timm and torchvision where they install without another torch).
# Safe to run again: each step is skipped or a no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v dot >/dev/null 2>&1 || need_apt+=(graphviz)
[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need_apt[*]} with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# The CPU build first: a plain `pip install torch` would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,plot]"
# TensorBoard (--tensorboard DIR) and torchjd's balancers (--weighting upgrad, ...): neither pulls
# another torch (torch 2.13.0+cpu satisfies both). A failure here only makes their tests skip.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[tensorboard]" \
  || echo "setup: tensorboard not installed; its tests will be skipped" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[torchjd]" \
  || echo "setup: torchjd not installed; its balancers' tests will be skipped" >&2
# Optional: timm and torchvision, so their backbone tests run rather than skip. --no-deps, because
# their dependency on torch would let pip replace the CPU build; torchvision 0.28.0 is the release
# made for torch 2.13.0. A failure here only makes those tests skip.
if ! .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps torchvision==0.28.0 timm \
     || ! .venv/bin/python -m pip install -q --disable-pip-version-check huggingface_hub; then
  echo "setup: timm/torchvision not installed; their tests will be skipped" >&2
fi
.venv/bin/python -c "import automtl, torch; print(f'setup: automtl {automtl.__version__} with torch {torch.__version__} is ready in .venv')" >&2
