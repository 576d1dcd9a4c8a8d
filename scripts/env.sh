# Sourced by the other scripts: where darts keeps its libtorch and its build cache (outside the checkout).
DARTS_CACHE="${DARTS_CACHE:-$HOME/.cache/darts}"
DARTS_VENV="$DARTS_CACHE/venv"
DARTS_TORCH_VERSION="2.11.0"
export LIBTORCH="$DARTS_VENV/lib/python3.11/site-packages/torch"
if [ -x "$DARTS_VENV/bin/python" ]; then
  LIBTORCH="$("$DARTS_VENV/bin/python" -c 'import os,sysconfig;print(os.path.join(sysconfig.get_paths()["purelib"],"torch"))')"
  export LIBTORCH
fi
# A shared target folder: a fresh clone reuses the (slow) libtorch C++ wrapper build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$DARTS_CACHE/target}"
# libtorch's OpenMP threads spin-wait by default and collapse when cores are shared.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
