#!/usr/bin/env bash
# The Python environment of the interop tests (tests/interop.rs): pinned torch,
# transformers, PEFT, TensorBoard, gguf (transformers' GGUF loader), the openai client and
# Selenium (tests/serve.rs; the browser itself is Debian's chromium + chromium-driver) from
# PyPI, in a venv.
#
#   bash tools/interop-env.sh [DIR]     # default target/interop-venv (~5.6 GB with torch's
#                                       # CUDA wheels, which PyPI's Linux torch pulls in)
# The tests find DIR/bin/python there, or the python named by LNTUNE_INTEROP_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-target/interop-venv}
PINS=(torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors==0.8.0 tensorboard==2.21.0 gguf==0.19.0 openai==3.60.0 selenium==4.51.0)
if [ -x "$DIR/bin/python" ] && [ "$(cat "$DIR/.pins" 2>/dev/null)" = "${PINS[*]}" ]; then
  echo "interop venv ready: $DIR"
  exit 0
fi
rm -rf "$DIR"
python3 -m venv "$DIR"
"$DIR/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
echo "${PINS[*]}" > "$DIR/.pins"
echo "interop venv ready: $DIR"
