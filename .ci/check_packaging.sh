#!/usr/bin/env bash
# CI step: the wheel installs what its code imports. Builds the wheel, installs it into a clean
# venv with only its core dependencies and imports the core entry points and the `dart` command;
# then adds each extra and imports what that extra is for. Versions are held to requirements.txt
# (-c), so the check is about what is declared, not about new upstream releases.
#
# Env: DART_PACKAGING_DIR (default a mktemp dir, removed at exit).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$(date +%s)
log() { echo "[packaging $(($(date +%s) - start))s] $*"; }
WORK="${DART_PACKAGING_DIR:-$(mktemp -d)}"
[[ -n "${DART_PACKAGING_DIR:-}" ]] || trap 'rm -rf "$WORK"' EXIT
BUILD_PY="${BUILD_PY:-$ROOT/.venv/bin/python}"

log "building the wheel (against the torch in $("$BUILD_PY" -c 'import torch; print(torch.__version__)'))"
"$BUILD_PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/wheel" .
WHEEL="$(ls "$WORK"/wheel/dart-*.whl)"
log "wheel: $(basename "$WHEEL")"

python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check -c "$ROOT/requirements.txt")
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" "$WHEEL"
log "core installed; importing the core entry points"
cd "$WORK"  # never import the checkout's sources
"$PY" - <<'PYEOF'
import torch.nn as nn  # noqa: F401

import dart
import dart_ext
from dart.runtime import runner  # noqa: F401  (torch only)

assert hasattr(__import__("torch").ops.dart, "gathered_glu_ffn"), dart_ext
for name in dart.__all__:
    getattr(dart, name)
assert dart.fast.FastGenerator is dart.FastGenerator
print("core ok, torch", __import__("torch").__version__)
PYEOF
"$WORK/venv/bin/dart" --help >/dev/null
log "the dart command starts with the core dependencies"

check_extra() {  # extra, python statements
  "${PIP[@]}" "$WHEEL[$1]"
  "$PY" -c "$2"
  log "extra [$1] ok"
}
check_extra models "import gguf, safetensors; import dart.assets.models"
check_extra eval "import rouge_score, nltk; import dart.evaluate"
check_extra plots "import dart.report, dart.lmeval.report"
check_extra lightning "import dart.lightning, dart.experiment"
check_extra lmeval "import lm_eval; import dart.lmeval"
check_extra test "import pytest, xdist, hypothesis, expecttest"
"$WORK/venv/bin/dart" eval ppl --help >/dev/null
log "done"
