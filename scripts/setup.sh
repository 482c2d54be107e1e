#!/usr/bin/env bash
# Idempotent environment setup: Debian's Open MPI, graphviz, iproute2 and OpenSSH (for the two-node tests), .venv/
# with torch 2.14.1 + torchvision 0.29.1, Horovod 0.28.1 built with the fixes in scripts/install_horovod.sh (wheel
# cached outside the repository), the project in editable mode with its dev, viz and export extras (which puts the
# hvd-pcdarts-* commands in .venv/bin), then `horovodrun --check-build` must list PyTorch, MPI and Gloo.
#   HVD_PCDARTS_GPU=1 scripts/setup.sh   also builds Horovod's NCCL GPU operations
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=${PYTHON_BOOTSTRAP:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.29.1}
log() { echo "[setup] $*" >&2; }

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin)
command -v mpicxx >/dev/null 2>&1 || need_apt+=(libopenmpi-dev)
command -v dot >/dev/null 2>&1 || need_apt+=(graphviz)
# the two-node tests (tests/cluster): network namespaces (iproute2) with an OpenSSH server in each
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need_apt+=(iproute2)
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
if ! "$VPY" -c "import torch, torchvision, sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' and torchvision.__version__.split('+')[0]=='$TORCHVISION_VERSION' else 1)" 2>/dev/null; then
  log "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION"
  "$VPY" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$VPY" -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$VPY" -c "import torch, torchvision" || { echo "setup: torch/torchvision install failed" >&2; exit 1; }
fi

PYTHON="$VPY" bash "$ROOT/scripts/install_horovod.sh" 2>&1 | grep -v '^WARNING: Location' >&2 || true
"$VPY" -c "import horovod.torch" || { echo "setup: horovod did not install (see above)" >&2; exit 1; }

if ! "$VPY" -c "import hvd_pcdarts, mpi4py, sklearn, tqdm, tensorboard, pytest, xdist, graphviz, matplotlib, onnx, onnxscript, onnxruntime" 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.hvd_pcdarts_installed" ]; then
  log "installing the project (editable) with its dev, viz and export extras"
  "$VPY" -m pip install -q -e ".[dev,viz,export]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$VPY" -c "import hvd_pcdarts, mpi4py, sklearn, tqdm, tensorboard, pytest, xdist, onnxruntime" || { echo "setup: project install failed" >&2; exit 1; }
  touch "$VENV/.hvd_pcdarts_installed"
fi

CHECK=$("$VENV/bin/horovodrun" --check-build 2>&1)
for item in PyTorch MPI Gloo; do
  echo "$CHECK" | grep -q "\[X\] $item" || { echo "$CHECK" >&2; echo "setup: horovodrun --check-build does not list $item" >&2; exit 1; }
done
log "ready: $("$VPY" -c 'import torch, horovod; print(f"torch {torch.__version__}, horovod {horovod.__version__}")'), horovodrun --check-build lists PyTorch, MPI and Gloo"
