#!/usr/bin/env bash
# Builds, here, what a GPU machine needs beside the working tree to run scripts/gpu/run.sh, into a git-ignored
# folder (default .gpu-carry/, the `carry` of a device run), and checks that it fits the 64 MiB that travel:
#
#   tritonserver.tar.xz   the nvidia-pytriton wheel's server, Python backend and the Python backend stub(s) of
#                         --stubs (default 3.12, the GPU machine's Python) only
#   triton-libs.tar.xz    the wheel's bundled shared libraries those need (their NEEDED closure, not all 115 MB)
#   numpy.tar.xz          numpy 1.26.4 for CPython 3.12 (the wheel's files less tests, f2py, distutils, stubs):
#                         Triton's Python backend answers with empty tensors when its stub sees numpy 2
#   reference.npz         real inputs and ONNX Runtime's answers for the parity checks (scripts/gpu/reference.py)
#
# Each is rebuilt only when missing (or with --force). --fast compresses with xz -1 (a rehearsal's carry).
#
#   scripts/gpu/prepare.sh [--out DIR] [--stubs "3.12 3.11"] [--fast] [--force]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT="$ROOT/.gpu-carry"
STUBS="3.12"
XZ_LEVEL="-9e"
FORCE=0
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
NUMPY_VERSION=1.26.4
BUDGET_BYTES=$((64 * 1024 * 1024))
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$(realpath -m "$2"); shift 2 ;;
    --stubs) STUBS="$2"; shift 2 ;;
    --fast) XZ_LEVEL="-1"; shift ;;
    --force) FORCE=1; shift ;;
    *) echo "prepare.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

mkdir -p "$OUT"
SITE=$("$PYTHON" -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).resolve().parents[1])')
WHEEL="$SITE/pytriton/tritonserver"
LIBS="$SITE/nvidia_pytriton.libs"
STAGE=$(mktemp -d /tmp/cspine-gpu-prepare.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT

jobs=()  # the compressions running in the background
fresh() {  # fresh FILE: true when FILE exists and --force was not given
  [ "$FORCE" = 0 ] && [ -s "$1" ]
}

# The server: binary, Python backend, and only the asked-for stubs.
if ! fresh "$OUT/tritonserver.tar.xz"; then
  mkdir -p "$STAGE/tritonserver/bin" "$STAGE/tritonserver/backends/python"
  cp "$WHEEL/bin/tritonserver" "$STAGE/tritonserver/bin/"
  cp "$WHEEL/backends/python/libtriton_python.so" "$WHEEL/backends/python/triton_python_backend_utils.py" \
    "$STAGE/tritonserver/backends/python/"
  for version in $STUBS; do
    mkdir -p "$STAGE/tritonserver/python_backend_stubs/$version"
    cp "$WHEEL/python_backend_stubs/$version/triton_python_backend_stub" "$STAGE/tritonserver/python_backend_stubs/$version/"
  done
  (set -o pipefail; tar -C "$STAGE" -cf - tritonserver | xz "$XZ_LEVEL" -T2 >"$OUT/tritonserver.tar.xz.partial") &
  jobs+=($!)
fi

# The bundled libraries the server, the backend and the stubs load, directly or through each other.
if ! fresh "$OUT/triton-libs.tar.xz"; then
  mkdir -p "$STAGE/libs"
  queue=("$WHEEL/bin/tritonserver" "$WHEEL/backends/python/libtriton_python.so")
  for version in $STUBS; do queue+=("$WHEEL/python_backend_stubs/$version/triton_python_backend_stub"); done
  while [ ${#queue[@]} -gt 0 ]; do
    file=${queue[0]}
    queue=("${queue[@]:1}")
    for needed in $(readelf -d "$file" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      if [ -f "$LIBS/$needed" ] && [ ! -f "$STAGE/libs/$needed" ]; then
        cp "$LIBS/$needed" "$STAGE/libs/"
        queue+=("$LIBS/$needed")
      fi
    done
  done
  (set -o pipefail; tar -C "$STAGE" -cf - libs | xz "$XZ_LEVEL" -T2 >"$OUT/triton-libs.tar.xz.partial") &
  jobs+=($!)
fi

# numpy < 2 for CPython 3.12, repacked without what importing it never reads.
if ! fresh "$OUT/numpy.tar.xz"; then
  WHEELS="$ROOT/.cache/gpu-wheels"
  mkdir -p "$WHEELS" "$STAGE/numpy"
  ls "$WHEELS"/numpy-$NUMPY_VERSION-cp312-*.whl >/dev/null 2>&1 ||
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "numpy==$NUMPY_VERSION"
  "$PYTHON" -m zipfile -e "$WHEELS"/numpy-$NUMPY_VERSION-cp312-*.whl "$STAGE/numpy"
  (
    set -o pipefail
    tar -C "$STAGE/numpy" --exclude=tests --exclude='*.pyi' --exclude=f2py --exclude=distutils -cf - . |
      xz "$XZ_LEVEL" -T2 >"$OUT/numpy.tar.xz.partial"
  ) &
  jobs+=($!)
fi

if ! fresh "$OUT/reference.npz"; then
  "$PYTHON" "$ROOT/scripts/gpu/reference.py" --out "$OUT/reference.npz"
fi
for job in ${jobs[@]+"${jobs[@]}"}; do wait "$job"; done
for partial in "$OUT"/*.partial; do
  if [ -e "$partial" ]; then mv "$partial" "${partial%.partial}"; fi
done

# What travels: the whole carry folder (anything else left in it counts too) and the working tree.
ls -l "$OUT"
cd "$ROOT"
git ls-files -z --cached --others --exclude-standard | "$PYTHON" -c '
import os, sys
carry, budget = sys.argv[1], int(sys.argv[2])
carried = sum(e.stat().st_size for e in os.scandir(carry) if e.is_file())
tree = sum(os.path.getsize(p) for p in sys.stdin.read().split("\0") if p and os.path.isfile(p))
print(f"carry {carry}: {carried / 1e6:.1f} MB; working tree {tree / 1e6:.1f} MB; "
      f"together {(carried + tree) / 1e6:.1f} MB of {budget / 1e6:.1f} MB (64 MiB)")
sys.exit(0 if carried + tree <= budget else "prepare.sh: the working tree and the carry exceed the 64 MiB a device run takes")
' "$OUT" "$BUDGET_BYTES"
