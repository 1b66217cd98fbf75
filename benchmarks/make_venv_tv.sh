#!/usr/bin/env bash
# The baseline venv (.venv-tv): torch 2.14.1 + torchvision 0.29.1, so that transformers picks its
# default, torchvision-backed Qwen2-VL image processor (the one users run), with the same
# transformers and other packages as .venv (pinned from its freeze), plus py-spy. fastload itself
# comes from PYTHONPATH (its C++ extension is plain CPython API: the in-place build works here).
#   bash benchmarks/make_venv_tv.sh       (after `bash run.sh test` set up .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
PINS=$(.venv/bin/pip freeze | grep -iE '^(av|braceexpand|filelock|fsspec|hf-xet|huggingface_hub|jinja2|markupsafe|mpmath|networkx|numpy|packaging|pillow|psutil|pyarrow|pytest|pyyaml|regex|requests|rich|safetensors|simplejpeg|sympy|tokenizers|tqdm|transformers|typing_extensions|webdataset)==')
[ -x .venv-tv/bin/python ] || "$BASE" -m venv .venv-tv
# shellcheck disable=SC2086
.venv-tv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 py-spy $PINS
.venv/bin/python setup.py build_ext --inplace -q
PYTHONPATH=. .venv-tv/bin/python -c "
from transformers import AutoImageProcessor
p = AutoImageProcessor.from_pretrained('${FASTLOAD_SHARED:-../shared}/qwen2_5_vl')
print('transformers default image processor:', type(p).__module__ + '.' + type(p).__name__)"
