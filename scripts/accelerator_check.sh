#!/usr/bin/env bash
# The accelerator check in one command (docs/accelerator.md):
#
#   bash scripts/accelerator_check.sh OUT [more flags of scripts/accelerator_check.py]
#
# From the repository root's ignored folder .acc/ it takes, when there:
#   .acc/*.whl                Python wheels the accelerator's image lacks (ml_collections),
#                             installed into a temporary folder, not into the environment;
#   .acc/cifar10_subset.npz   the real run's data (else pass --data_path=...; none: skipped).
# Results: OUT/<device>/accelerator_check.{json,md}, the log in OUT/accelerator_check.log.
# A hard stop at 480 s (ACC_TIMEOUT_S) backs up the script's own budget (--budget_s, 420 s);
# the JSON is rewritten after every part, so even a stopped run leaves what it measured.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${1:?usage: bash scripts/accelerator_check.sh OUT [flags]}
shift
py=${PYTHON:-python3}
if compgen -G '.acc/*.whl' > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/acc_site .acc/*.whl || exit 1
  export PYTHONPATH=/tmp/acc_site${PYTHONPATH:+:$PYTHONPATH}
fi
data=()
if [[ -f .acc/cifar10_subset.npz && " $* " != *" --data_path="* ]]; then
  data=(--data_path=.acc/cifar10_subset.npz)
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout "${ACC_TIMEOUT_S:-480}" "$py" -m scripts.accelerator_check --out="$out" "${data[@]}" "$@" \
    2>&1 | grep -v '^I[0-9]\{4\} ' | tee "$out/accelerator_check.log"
