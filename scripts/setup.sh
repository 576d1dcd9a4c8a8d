#!/usr/bin/env bash
# Installs libtorch (from the torch==2.11.0 wheel on PyPI) once into a cache outside the checkout.
# Idempotent: a second run checks the installed version and returns at once.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/env.sh"
mkdir -p "$DARTS_CACHE"
want="$DARTS_TORCH_VERSION"
have=""
if [ -x "$DARTS_VENV/bin/python" ]; then
  have="$("$DARTS_VENV/bin/python" -c 'import torch;print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
fi
if [ "$have" != "$want" ]; then
  echo "darts setup: installing torch==$want into $DARTS_VENV (once; a few GB)" >&2
  python3 -m venv "$DARTS_VENV"
  "$DARTS_VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$want" numpy
fi
if ! "$DARTS_VENV/bin/python" -c 'import onnx, onnxruntime' >/dev/null 2>&1; then
  # ONNX's checker and ONNX Runtime: the deploy tests check darts export's files with both.
  echo "darts setup: installing onnx and onnxruntime into $DARTS_VENV (once; for the export tests)" >&2
  "$DARTS_VENV/bin/python" -m pip install -q --disable-pip-version-check "onnx==1.23.2" "onnxruntime==1.32.0" || \
    echo "darts setup: could not install onnx/onnxruntime (the export tests then use tract only)" >&2
fi
cu13="$("$DARTS_VENV/bin/python" -c 'import os, torch; d = os.path.dirname(torch.__file__); print(os.path.join(d, "..", "nvidia", "cu13", "include") if torch.version.cuda else "")' 2>/dev/null || true)"
if [ -n "$cu13" ] && [ -d "$cu13" ] && { [ ! -f "$cu13/crt/host_config.h" ] || [ ! -f "$cu13/nv/target" ]; }; then
  # ProcessGroupNCCL's headers read CUDA's compiler and CCCL headers, which torch's runtime wheels leave out: the
  # two small header wheels of the same CUDA release (darts' shim then builds c10d's NCCL backend).
  rt="$("$DARTS_VENV/bin/python" -c 'import importlib.metadata as m; v = m.version("nvidia-cuda-runtime").split("."); print(v[0] + "." + v[1])' 2>/dev/null || true)"
  echo "darts setup: installing CUDA $rt's crt and CCCL headers into $DARTS_VENV (once; for NCCL runs)" >&2
  [ -n "$rt" ] && "$DARTS_VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    "nvidia-cuda-crt==$rt.*" "nvidia-cuda-cccl==$rt.*" || \
    echo "darts setup: could not install CUDA's headers (darts then builds without NCCL; Gloo still works)" >&2
fi
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # Optional: the full Fashion-MNIST from Debian (the built-in subset needs nothing).
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
   echo "darts setup: could not install dataset-fashion-mnist (only needed for the full dataset)" >&2
fi
if [ ! -f /usr/include/gloo/config.h ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # gloo's headers, which the torch wheel lacks: darts' shim builds c10d's ProcessGroupGloo (multi-process runs).
  echo "darts setup: installing libgloo-dev (once; for data-parallel runs)" >&2
  (apt-get install -y -qq libgloo-dev >/dev/null 2>&1 || \
   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libgloo-dev >/dev/null 2>&1)) || \
   echo "darts setup: could not install libgloo-dev (darts then builds without multi-process runs)" >&2
fi
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # For the test that opens a run report in a real headless browser (Debian's chromium).
  echo "darts setup: installing chromium (once; for the report test)" >&2
  (apt-get install -y -qq chromium >/dev/null 2>&1 || \
   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) || \
   echo "darts setup: could not install chromium (the report's browser test needs it)" >&2
fi
. "$here/env.sh"
echo "darts setup: libtorch at $LIBTORCH" >&2
