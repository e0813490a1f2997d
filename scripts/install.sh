#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install lsys into it.
#   scripts/install.sh [VENV_DIR] [EXTRAS]       defaults: .venv, dev
# torch comes first so that pip never swaps it: on a machine with an NVIDIA GPU and a
# torch already installed, the environment sees that torch (--system-site-packages);
# without a GPU, the CPU build of torch is installed, never the CUDA packages.
set -euo pipefail
venv="${1:-.venv}"
extras="${2:-dev}"
python="${PYTHON:-python3}"
torch_version="${LSYS_TORCH_VERSION:-2.13.0}"
cpu_index="${LSYS_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
index_reachable() { "$python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$1/torch/" >/dev/null 2>&1; }

if [ ! -x "$venv/bin/python" ]; then
  if has_gpu && "$python" -c "import torch" >/dev/null 2>&1; then
    echo "install: GPU machine with torch $("$python" -c 'import torch; print(torch.__version__)'): keeping it"
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "install: torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)') already present"
elif has_gpu; then
  "${pip[@]}" install "torch==$torch_version"
elif index_reachable "$cpu_index"; then
  "${pip[@]}" install "torch==$torch_version" --index-url "$cpu_index"
else
  # No PyTorch CPU index here (an offline mirror, say): take torch from the configured
  # package sources and refuse a CUDA build.
  "${pip[@]}" install "torch==$torch_version"
  if [ "$("$venv/bin/python" -c 'import torch; print(torch.version.cuda or "")')" != "" ]; then
    echo "install: got a CUDA build of torch on a machine without a GPU; set LSYS_TORCH_CPU_INDEX" >&2
    exit 1
  fi
fi
"${pip[@]}" install -e ".[$extras]"
echo "install: done ($venv, torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'))"
