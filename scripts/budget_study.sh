#!/usr/bin/env bash
# The per-layer budget rule chosen on SmolLM2-135M and Qwen2.5-Coder-1.5B together
# (docs/results/budget/README.md): every candidate spelled out in full, so a point means the
# same whatever BudgetConfig's defaults are.
#
#   scripts/budget_study.sh calibration smollm2    # the grid, wiki calibration split
#   scripts/budget_study.sh calibration qwen
#   scripts/budget_study.sh eval smollm2 b-keep67  # held out: dense, GRIFFIN, old default, chosen
#   scripts/budget_study.sh eval qwen b-keep67
#
# ONLY (a comma list) runs those points instead, in its order; EXTRA_ARGS (words) go last to
# `python -m dart.study`, overriding the flags above (another corpus or length).
# OUT (default results/budget) holds the resumable run folders; rerunning resumes them.
# PYTHON (default python) runs dart; Qwen runs q8 weights at one thread (a shared CPU).
set -euo pipefail
split=${1:?usage: budget_study.sh calibration|eval smollm2|qwen [chosen point]}
model=${2:?usage: budget_study.sh calibration|eval smollm2|qwen [chosen point]}
chosen=${3:-}
out=${OUT:-results/budget}
python=${PYTHON:-python}

# the candidates: the normalised statistic and magnitude ranking of every DART point, the
# budget's knobs all given (the old default first)
base='"statistic": "normalized_l2", "ranking": "magnitude"'
budget() {  # sensitivity uniform_blend blend_toward prune_max min_keep_ratio
  printf '{%s, "budget": {"sensitivity": "%s", "normalize": "minmax", "cap_margin": null, "uniform_blend": %s, "blend_toward": "%s", "prune_max": %s, "min_keep_ratio": %s, "prune_min": 0.1, "depth_early": 0.3, "depth_late": 0.15, "early_floor": 0.25, "late_floor": 0.35}}' \
    "$base" "$1" "$2" "$3" "$4" "$5"
}
declare -A points=(
  [b-default]="$(budget residual 0.5 sensitivity 0.9 null)"
  [b-uniform]="$(budget residual 1.0 uniform 0.9 null)"
  [b-sblend75]="$(budget residual 0.75 sensitivity 0.9 null)"
  [b-sblend100]="$(budget residual 1.0 sensitivity 0.9 null)"
  [b-sblend75-keep67]="$(budget residual 0.75 sensitivity 0.9 0.6667)"
  [b-sblend100-keep67]="$(budget residual 1.0 sensitivity 0.9 0.6667)"
  [b-ublend50]="$(budget residual 0.5 uniform 0.9 null)"
  [b-ublend75]="$(budget residual 0.75 uniform 0.9 null)"
  [b-max80]="$(budget residual 0.5 sensitivity 0.8 null)"
  [b-max85]="$(budget residual 0.5 sensitivity 0.85 null)"
  [b-keep67]="$(budget residual 0.5 sensitivity 0.9 0.6667)"
  [b-keep80]="$(budget residual 0.5 sensitivity 0.9 0.8)"
  [b-raw]="$(budget raw 0.5 sensitivity 0.9 null)"
)
# most informative first (a study cut short still compares the first ones on both models);
# b-uniform is GRIFFIN's budget under DART's statistic (the eval split has GRIFFIN itself)
order=(b-default b-keep67 b-sblend75 b-ublend75 b-ublend50 b-uniform b-max80 b-max85 b-raw
       b-keep80 b-sblend100 b-sblend75-keep67 b-sblend100-keep67)

case $model in
  smollm2) args=(--model smollm2-135m --max-tokens 2048) ;;  # 7 windows of 512
  # Qwen on a loaded 2-core CPU at one thread: one window of 512 on calibration (511 tokens
  # scored, masks from the first 128), two on eval (767 tokens)
  qwen) args=(--model qwen2.5-coder-1.5b --weights q8
              --max-tokens "$([ "$split" = calibration ] && echo 512 || echo 768)") ;;
  *) echo "model: smollm2 or qwen, not $model" >&2; exit 2 ;;
esac
case $split in
  calibration) only=(dense "${order[@]}") ;;
  eval) only=(dense griffin b-default ${chosen:+"$chosen"}) ;;  # the chosen point last

  *) echo "split: calibration or eval, not $split" >&2; exit 2 ;;
esac

extra=()
for name in "${!points[@]}"; do extra+=(--extra "$name=${points[$name]}"); done
only_csv=${ONLY:-$(IFS=,; echo "${only[*]}")}
exec "$python" -m dart.study --task ppl --corpora wiki --split "$split" --prunes 0.5,0.7 \
  --threads 1 "${args[@]}" "${extra[@]}" --only "$only_csv" --out "$out/$model-$split" \
  ${EXTRA_ARGS:-}
