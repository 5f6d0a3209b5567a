#!/usr/bin/env bash
# The whole pipeline end to end on generated inputs, through the real DAG and operators:
# fetch -> Alpaca to conversations -> MindRecord -> HF import -> shard -> msrun LoRA fine-tune
# (2 CPU ranks, data parallel). Needs no network and no data of yours. Usage: scripts/demo.sh [DIR]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$repo/demo_output}" && cd "${1:-$repo/demo_output}" && pwd)"
venv="${VENV:-$repo/.venv}"
export PATH="$venv/bin:$PATH"

echo "== generating demo inputs in $out/inputs"
python -m llama_core.demo "$out/inputs" >/dev/null

export AIRFLOW_HOME="$out/airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$repo/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__LOGGING__LOGGING_LEVEL=INFO
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export LLAMA_LORA_WORK_ROOT="$out"  # the validate task refuses a work_dir outside it
echo "== Airflow metadata DB (SQLite) in $AIRFLOW_HOME"
airflow db migrate >"$out/airflow-db.log" 2>&1 || { cat "$out/airflow-db.log"; exit 1; }

conf=$(python - "$out" "$repo" <<'PY'
import json, sys
from llama_core.demo import demo_params
out, repo = sys.argv[1:]
print(json.dumps(demo_params(f"{out}/inputs", f"{out}/work", f"{repo}/configs/lora_llama2_tiny.yaml")))
PY
)
echo "== running DAG llama2_lora_finetune (log: $out/dag-run.log)"
if ! airflow dags test llama2_lora_finetune -c "$conf" >"$out/dag-run.log" 2>&1; then
  tail -n 60 "$out/dag-run.log"
  echo "demo FAILED: full log in $out/dag-run.log" >&2
  exit 1
fi
grep -E "Marking run|msrun.rank_0\].*(loss|step)" "$out/dag-run.log" | tail -n 8 || true
summary=$(ls -t "$out"/work/runs/*/train_summary.json 2>/dev/null | head -n 1)
echo "== done. Training summary: ${summary:-<none>}"
[ -n "$summary" ] && python -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in s if k != 'loss_series'})" "$summary"
