#!/usr/bin/env bash
# fastload's two entry points; each sets up everything it needs on a fresh machine.
#   bash run.sh demo   shard ../shared/data/mllm_demo (or generated data) and stream it through the loader
#   bash run.sh test   run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"

VENV=${FASTLOAD_VENV:-.venv}
TORCH_PIN=${FASTLOAD_TORCH:-torch==2.13.0}   # a loose torch pulls a multi-GB CUDA build
EXTRAS="test,parquet,plot"
STAMP="$VENV/.fastload-install"

# What the install is made from: its metadata, the C++ kernel's sources, the extras asked for.
# The package itself is installed editable, so its Python files need no reinstall.
install_inputs() {
  local files=(pyproject.toml csrc)
  for f in setup.py setup.cfg; do
    if [ -e "$f" ]; then files+=("$f"); fi
  done
  { echo "extras=$EXTRAS"
    find "${files[@]}" -type f | LC_ALL=C sort | xargs sha256sum
  } | sha256sum | cut -d' ' -f1
}

# Found without importing it (importing torch alone takes seconds).
has_module() {
  "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
  fi
  if ! has_module torch; then
    "$VENV/bin/pip" install -q "$TORCH_PIN"
  fi
  local wanted
  wanted=$(install_inputs)
  # Reinstalling costs ~15 s: only when an input changed, or the kernel the editable install
  # builds into fastload/ is gone.
  if [ "$(cat "$STAMP" 2>/dev/null)" != "$wanted" ] || ! compgen -G "fastload/_kernels*.so" >/dev/null; then
    rm -f "$STAMP"
    "$VENV/bin/pip" install -q -e ".[$EXTRAS]"
    echo "$wanted" > "$STAMP"
  fi
}

case "${1:-}" in
  demo)
    setup
    shift
    exec "$VENV/bin/python" benchmarks/demo.py "$@"
    ;;
  test)
    setup
    shift
    exec "$VENV/bin/python" -m pytest tests "$@"
    ;;
  *)
    echo "usage: bash run.sh demo|test [args]" >&2
    exit 2
    ;;
esac
