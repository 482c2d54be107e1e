#!/usr/bin/env bash
# Build (once) and install Horovod 0.28.1 into the active Python environment, patched so that it builds
# against torch >= 2.14 (C++20 headers). The built wheel is cached outside the repository, keyed by the
# Horovod, torch and Python versions and by the GPU variant, so later installs take seconds.
#
#   PYTHON=.venv/bin/python scripts/install_horovod.sh            # CPU build: Gloo + MPI controllers
#   HVD_PCDARTS_GPU=1 PYTHON=... scripts/install_horovod.sh       # + NCCL GPU operations (CUDA toolkit needed)
#
# Environment:
#   PYTHON                   interpreter of the target environment (default: python3 on PATH)
#   HVD_PCDARTS_GPU          1 = build NCCL GPU operations (default 0)
#   HVD_PCDARTS_WHEEL_CACHE  wheel cache folder (default ~/.cache/hvd-pcdarts/wheels)
#   HOROVOD_VERSION          default 0.28.1
#   MAX_JOBS                 parallel compile jobs (default: number of cores)
# Why each fix is needed: see docs/install.md, "The Horovod build".
set -euo pipefail

PYTHON=${PYTHON:-python3}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
GPU=${HVD_PCDARTS_GPU:-0}
CACHE=${HVD_PCDARTS_WHEEL_CACHE:-$HOME/.cache/hvd-pcdarts/wheels}

log() { echo "[install_horovod] $*" >&2; }
die() { echo "install_horovod: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$PYTHON'"
PYTHON=$(command -v "$PYTHON"); case "$PYTHON" in /*) ;; *) PYTHON="$PWD/$PYTHON";; esac
TORCH_VERSION=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null) \
  || die "torch is not installed in $PYTHON's environment; install torch first (make setup does)"
PY_TAG=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
VARIANT=cpu; [ "$GPU" = 1 ] && VARIANT=nccl
PATCHES=waitsleep   # the source fixes below that change the built code (part of the cache key and the marker)
KEY="horovod-${HOROVOD_VERSION}-torch${TORCH_VERSION}-${PY_TAG}-${VARIANT}-${PATCHES}"
WHEEL_DIR="$CACHE/$KEY"

# Already installed and importable with the wanted version and build?
if "$PYTHON" - "$HOROVOD_VERSION" "$GPU" "$PATCHES" <<'PY' 2>/dev/null; then
import os
import sys
import horovod
import horovod.torch as hvd
assert horovod.__version__ == sys.argv[1]
assert hvd.mpi_built() and hvd.gloo_built()
if sys.argv[2] == "1":
    assert hvd.nccl_built()
with open(os.path.join(os.path.dirname(horovod.__file__), "HVD_PCDARTS_PATCHES")) as f:
    assert f.read().split() == [sys.argv[3]]
PY
  log "horovod $HOROVOD_VERSION already installed and working ($KEY)"
  exit 0
fi

"$PYTHON" -m pip install -q cffi psutil pyyaml cloudpickle packaging wheel setuptools >&2

if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
  command -v mpicxx >/dev/null 2>&1 || die "Open MPI development files are missing: apt-get install openmpi-bin libopenmpi-dev"
  command -v cmake >/dev/null 2>&1 || "$PYTHON" -m pip install -q cmake >&2
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  log "downloading the horovod $HOROVOD_VERSION sdist"
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$WORK" "horovod==$HOROVOD_VERSION" >&2
  tar -xzf "$WORK"/horovod-"$HOROVOD_VERSION".tar.gz -C "$WORK"
  SRC="$WORK/horovod-$HOROVOD_VERSION"
  # Fix 1: torch >= 2.14 headers need C++20; both files (the top-level one too, or the Gloo link breaks).
  sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 20/' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 20' "$SRC/CMakeLists.txt" || die "C++ standard patch did not apply to CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 20' "$SRC/horovod/torch/CMakeLists.txt" || die "C++ standard patch did not apply to horovod/torch/CMakeLists.txt"

  # Fix 5: a rank waiting for a collective (torch's WaitAndClear) polls with sched_yield in a loop, taking a
  # whole core from the ranks and loader workers it waits for on a shared CPU; it yields for 100 us, then
  # sleeps 50 us per poll. Measured in benchmarks/RESULTS.md, "A waiting rank sleeps".
  WAIT="$SRC/horovod/torch/mpi_ops_v2.cc"
  "$PYTHON" - "$WAIT" <<'PY' || die "the WaitAndClear patch did not apply to $WAIT"
import sys
path = sys.argv[1]
src = open(path).read()
head = "void WaitAndClear(int handle) {\n"
spin = "      std::this_thread::yield();\n"
start = src.index(head)
at = src.index(spin, start)
assert at - start < 200, "WaitAndClear is not the expected loop"
src = (src[:start] + head + "  auto wait_start = std::chrono::steady_clock::now();\n" + src[start + len(head):at]
       + "      if (std::chrono::steady_clock::now() - wait_start < std::chrono::microseconds(100)) {\n"
       + "        std::this_thread::yield();\n      } else {\n"
       + "        std::this_thread::sleep_for(std::chrono::microseconds(50));\n      }\n"
       + src[at + len(spin):])
open(path, "w").write(src)
PY

  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  export HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
  # Fix 2: the torch wheel is a CUDA build, so Horovod's CMake looks for the CUDA toolkit.
  if [ -d /usr/local/cuda ]; then
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} HOROVOD_CUDA_HOME=${HOROVOD_CUDA_HOME:-/usr/local/cuda}
  fi
  # Fix 3: gcc 13 / CMake 4 hosts.
  export CMAKE_POLICY_VERSION_MINIMUM=3.5
  GCC_MAJOR=$(gcc -dumpversion 2>/dev/null | cut -d. -f1 || echo 0)
  if [ "${GCC_MAJOR:-0}" -ge 13 ]; then
    export CXXFLAGS="${CXXFLAGS:-} -include cstdint -include string"
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  export CMAKE_BUILD_PARALLEL_LEVEL=$MAX_JOBS
  if [ "$GPU" = 1 ]; then
    "$PYTHON" -m pip install -q nvidia-nccl-cu13 >&2 || "$PYTHON" -m pip install -q nvidia-nccl-cu12 >&2
    NCCL_ROOT=$("$PYTHON" - <<'PY'
import importlib, os
for name in ("nvidia.nccl",):
    m = importlib.import_module(name)
    print(os.path.dirname(m.__file__) if m.__file__ else list(m.__path__)[0])
PY
)
    [ -f "$NCCL_ROOT/lib/libnccl.so.2" ] || die "nvidia-nccl wheel has no lib/libnccl.so.2 under $NCCL_ROOT"
    ln -sf libnccl.so.2 "$NCCL_ROOT/lib/libnccl.so"
    export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED
    export HOROVOD_NCCL_INCLUDE="$NCCL_ROOT/include" HOROVOD_NCCL_LIB="$NCCL_ROOT/lib"
    export LD_LIBRARY_PATH="$NCCL_ROOT/lib:${LD_LIBRARY_PATH:-}"
  fi
  log "building $KEY (minutes: 3 on 2 cores with a warm pip cache, up to 18 without)"
  mkdir -p "$WORK/dist"
  # Fix 4: no build isolation, so the build sees the installed torch.
  (cd "$SRC" && "$PYTHON" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/dist" .) > "$WORK/build.log" 2>&1 \
    || { tail -n 60 "$WORK/build.log" >&2; die "horovod build failed (log above)"; }
  mkdir -p "$WHEEL_DIR"
  # install into the cache atomically: a half-copied wheel must never look like a cached one
  WHL=$(ls "$WORK"/dist/horovod-*.whl | head -n 1)
  cp "$WHL" "$WHEEL_DIR/.$(basename "$WHL").part"
  mv "$WHEEL_DIR/.$(basename "$WHL").part" "$WHEEL_DIR/$(basename "$WHL")"
  log "cached $WHEEL_DIR/$(basename "$WHL")"
else
  log "using cached wheel in $WHEEL_DIR"
fi

"$PYTHON" -m pip install -q --force-reinstall --no-deps "$WHEEL_DIR"/horovod-*.whl >&2
"$PYTHON" - "$PATCHES" <<'PY'
import os
import sys
import horovod
with open(os.path.join(os.path.dirname(horovod.__file__), "HVD_PCDARTS_PATCHES"), "w") as f:
    f.write(sys.argv[1] + "\n")
PY
"$PYTHON" -m pip install -q psutil pyyaml cloudpickle packaging cffi >&2
"$PYTHON" -c 'import horovod.torch as hvd; assert hvd.mpi_built() and hvd.gloo_built(), "horovod lacks MPI or Gloo"' \
  || die "the installed horovod does not import or lacks MPI/Gloo"
log "horovod $HOROVOD_VERSION installed ($KEY)"
