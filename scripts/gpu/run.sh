#!/usr/bin/env bash
# The GPU run, in one command, on a machine with PyTorch (CUDA) and no package registry, given the carry that
# scripts/gpu/prepare.sh built here (default .gpu-carry/ of this checkout):
#
#   scripts/gpu/run.sh OUTDIR [--cpu] [gpu_bench options…]
#
# 1. unpacks the carried tritonserver and its libraries into a temporary folder;
# 2. makes a virtual environment on top of python3's packages (torch) whose own site-packages come first and hold
#    the carried numpy 1.26 when python3's numpy is 2 or later (the Python backend stub answers with empty tensors
#    under numpy 2), plus this checkout's services/ (cspine);
# 3. checks what the stub loads (libpython of this Python) and what the benchmark imports, before any long step;
# 4. runs python -m cspine.inference.gpu_bench: parity, Triton started with --model-config-name=gpu_torch on the
#    GPU, the measurements; OUTDIR gets results.json, results.md and run.log.
#
# --cpu is the rehearsal: the same steps with the device set to cpu (the serving repository's instance groups
# become KIND_CPU) and short cells. CSPINE_GPU_PYTHON names another Python than python3; CSPINE_GPU_CARRY another
# carry folder; CSPINE_GPU_TIMEOUT_S bounds the benchmark (default 480 s).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CARRY=$(realpath -m "${CSPINE_GPU_CARRY:-$ROOT/.gpu-carry}")
PYTHON=${CSPINE_GPU_PYTHON:-python3}
if [ $# -lt 1 ]; then
  echo "usage: scripts/gpu/run.sh OUTDIR [--cpu] [gpu_bench options…]" >&2
  exit 2
fi
OUTDIR=$(realpath -m "$1")
shift
DEVICE=cuda
CELL_ARGS=(--seconds 1.5 --budget-s 330)
if [ "${1:-}" = "--cpu" ]; then
  DEVICE=cpu
  CELL_ARGS=(--seconds 0.2 --warmup-calls 1 --budget-s 600)
  shift
fi
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/run.log") 2>&1
began=$(date +%s)
step() { echo "[run.sh +$(($(date +%s) - began)) s] $*"; }

for file in tritonserver.tar.xz triton-libs.tar.xz numpy.tar.xz reference.npz; do
  if [ ! -s "$CARRY/$file" ]; then
    echo "run.sh: $CARRY/$file is missing: run scripts/gpu/prepare.sh here and carry its folder" >&2
    exit 1
  fi
done
WORK=$(mktemp -d /tmp/cspine-gpu.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

step "unpacking tritonserver and its libraries into $WORK"
"$PYTHON" - "$CARRY" "$WORK" <<'EOF'
import sys, tarfile
carry, work = sys.argv[1:]
for name in ("tritonserver.tar.xz", "triton-libs.tar.xz"):
    with tarfile.open(f"{carry}/{name}") as archive:
        archive.extractall(work, filter="tar") if hasattr(tarfile, "data_filter") else archive.extractall(work)
EOF

step "environment: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
"$PYTHON" -m venv --without-pip "$WORK/venv"
VPY="$WORK/venv/bin/python"
VSITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The base's site-packages after the venv's own (a .pth line is appended to sys.path), then cspine's sources.
"$PYTHON" -c 'import site, sysconfig; print("\n".join(dict.fromkeys([sysconfig.get_paths()["purelib"], *site.getsitepackages()])))' \
  >"$VSITE/zz-base-site-packages.pth"
echo "$ROOT/services" >"$VSITE/cspine-services.pth"
major=$("$PYTHON" -c 'import numpy; print(numpy.__version__.split(".")[0])' 2>/dev/null || echo none)
if [ "$major" != "1" ]; then
  step "python3's numpy is ${major}.x: installing the carried numpy 1.26.4 into the environment"
  "$VPY" - "$CARRY/numpy.tar.xz" "$VSITE" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    archive.extractall(sys.argv[2], filter="tar") if hasattr(tarfile, "data_filter") else archive.extractall(sys.argv[2])
EOF
fi
"$VPY" - <<'EOF'
import numpy, torch
import cspine.inference.gpu_bench  # noqa: F401 — everything the benchmark imports is here
assert int(numpy.__version__.split(".")[0]) < 2, f"numpy {numpy.__version__} would reach the Python backend stub"
assert torch.from_dlpack(numpy.arange(3.0)).sum().item() == 3.0
print(f"numpy {numpy.__version__} ({numpy.__file__}), torch {torch.__version__}, cuda {torch.cuda.is_available()}")
EOF

version=$("$VPY" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
STUB="$WORK/tritonserver/python_backend_stubs/$version/triton_python_backend_stub"
if [ ! -x "$STUB" ]; then
  echo "run.sh: the carry has no Python backend stub for Python $version (prepare.sh --stubs \"$version\")" >&2
  exit 1
fi
LIBDIR=$("$VPY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
missing=$(LD_LIBRARY_PATH="$WORK/libs:$LIBDIR" ldd "$STUB" "$WORK/tritonserver/bin/tritonserver" | grep 'not found' || true)
if [ -n "$missing" ]; then
  echo "run.sh: the stub or the server cannot load: $missing (LIBDIR $LIBDIR)" >&2
  exit 1
fi
if [ "$DEVICE" = cuda ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi

step "benchmark on $DEVICE"
timeout --kill-after=10 "${CSPINE_GPU_TIMEOUT_S:-480}" "$VPY" -m cspine.inference.gpu_bench \
  --repository "$ROOT/model_repository" --reference "$CARRY/reference.npz" --out "$OUTDIR" --device "$DEVICE" \
  --triton "$WORK/tritonserver" --triton-libs "$WORK/libs" --workdir "$WORK" "${CELL_ARGS[@]}" "$@"
step "done"
cat "$OUTDIR/results.md"
