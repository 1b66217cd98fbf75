#!/usr/bin/env bash
# Every benchmark, one after another, into benchmarks/results/ (quoted in RESULTS.md).
#   bash benchmarks/run_all.sh        (after `bash run.sh test` or `bash run.sh demo` set up .venv)
#   PYTHON=../.venv-tv/bin/python bash benchmarks/run_all.sh   (transformers' torchvision baseline as well:
#                                     bash benchmarks/make_venv_tv.sh makes .venv-tv)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../.venv/bin/python}
export PYTHONPATH="$(cd .. && pwd)${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p results
for bench in bench_image bench_stages bench_shards bench_text bench_loader stage_account bench_first_batch \
             bench_video bench_packing; do
  echo "== $bench"
  "$PY" -W ignore "$bench.py" 2>&1 | tee "results/$bench.txt"
done
echo "== bench_remote"  # its progress and Ray's log go to stderr, the tables to the file
"$PY" -W ignore bench_remote.py --json results/bench_remote.json 2>/dev/null | tee results/bench_remote.txt
"$PY" -W ignore ../benchmarks/demo.py --samples 400 --out /tmp/fastload-bench-demo >/dev/null
../.venv/bin/fastload-bench '/tmp/fastload-bench-demo/shards/train-{000000..000003}.tar' \
  --processor "${FASTLOAD_SHARED:-../../shared}/qwen2_5_vl" --workers 0,1,2 --seconds 10 --compare torch \
  --json results/fastload_bench.json 2>&1 | tee results/fastload_bench.txt
