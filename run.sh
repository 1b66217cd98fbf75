#!/usr/bin/env bash
# fastload's two entry points; each sets up everything it needs on a fresh machine.
#   bash run.sh demo   shard ../shared/data/mllm_demo (or generated data) and stream it through the loader
#   bash run.sh test   run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"

VENV=${FASTLOAD_VENV:-.venv}
TORCH_PIN=${FASTLOAD_TORCH:-torch==2.13.0}   # a loose torch pulls a multi-GB CUDA build

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
  fi
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/pip" install -q "$TORCH_PIN"
  fi
  "$VENV/bin/pip" install -q -e ".[test,parquet]"
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
