#!/usr/bin/env bash
# Set up .venv for msad on a fresh machine; re-running it is safe and fast.
#   bash tools/setup.sh            (PYTHON=python3.11 bash tools/setup.sh to choose the Python)
# A detectron2 that the chosen Python already imports (for example your own CUDA build) is kept,
# with that Python's torch; otherwise torch/torchvision are pinned and Detectron2 is installed
# from the hash-checked sal-detectron2 snapshot (tools/install_detectron2.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MSAD_VENV:-.venv}
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

die() { echo "setup: error: $*" >&2; exit 1; }
command -v "$PYTHON" >/dev/null || die "no Python called '$PYTHON' (set PYTHON=...)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  die "$("$PYTHON" -V 2>&1) is too old: msad and Detectron2 need Python 3.10 or newer (set PYTHON=...)"

venv_flags=()
if "$PYTHON" -c 'import detectron2' 2>/dev/null; then
  echo "setup: $PYTHON already has detectron2; the venv will see it and that Python's torch"
  venv_flags=(--system-site-packages)
fi
# A venv whose interpreter does not run (interrupted creation, moved Python) is rebuilt.
if ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "${venv_flags[@]}" "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c 'import torch, torchvision' 2>/dev/null; then
  echo "setup: installing ${TORCH_PINS[*]}"
  pip_install "${TORCH_PINS[@]}"
fi
pip_install -r requirements.txt
"$PY" tools/install_detectron2.py --cache-dir .cache/detectron2
pip_install --no-deps -e .
"$PY" -m msad.utils.env
echo "setup: done; run the tests with: $PY -m pytest"
