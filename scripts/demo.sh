#!/usr/bin/env bash
# The whole pipeline end to end on generated inputs, through the real DAG and operators: pipeline
# llama2_tiny_lora_demo (configs/pipelines/) fetches its inputs from a loopback HTTP server, converts,
# tokenizes (with a held-out split), shards, fine-tunes on 2 CPU ranks with msrun, evaluates the base
# and the fine-tuned model, exports the adapter and the merged model, and writes the run's report.
# Needs no network and no data of yours. Usage: scripts/demo.sh [DIR]
# DEMO_PORT: the inputs' port (default 8765; a second demo with the same URLs hits the download cache).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$repo/demo_output}" && cd "${1:-$repo/demo_output}" && pwd)"
venv="${VENV:-$repo/.venv}"
export PATH="$venv/bin:$PATH"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

export AIRFLOW_HOME="$out/airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$repo/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__LOGGING__LOGGING_LEVEL=INFO
export LLAMA_LORA_WORK_ROOT="$out"  # the validate task refuses a work_dir outside it
# Only the demo's pipeline becomes a DAG here: each DAG parse of `airflow dags test` serializes every
# pipeline's DAG (seconds for the six shipped ones), and the demo runs one.
mkdir -p "$out/pipelines"
ln -sfn "$repo/configs/pipelines/llama2_tiny_lora_demo.yaml" "$out/pipelines/llama2_tiny_lora_demo.yaml"
export LLAMA_LORA_PIPELINES="$out/pipelines"

# The metadata DB is set up while the inputs are generated: neither needs the other.
echo "== Airflow metadata DB (SQLite) in $AIRFLOW_HOME; demo inputs in $out/inputs, served on 127.0.0.1"
airflow db migrate >"$out/airflow-db.log" 2>&1 &
migrate=$!
python -m llama_core.demo "$out/inputs" --serve --port "${DEMO_PORT:-8765}" >"$out/serve.log" 2>&1 &
server=$!
trap 'kill $server $migrate 2>/dev/null || true' EXIT
for _ in $(seq 3000); do  # up to 5 min: generating the inputs pre-trains the base model (seconds when idle)
  url=$(sed -n 's/^serving .* at \(http[^ ]*\)$/\1/p' "$out/serve.log")
  [ -n "$url" ] && break
  kill -0 $server 2>/dev/null || { cat "$out/serve.log"; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "the demo's HTTP server did not start: $out/serve.log" >&2; exit 1; }
wait $migrate || { cat "$out/airflow-db.log"; exit 1; }

conf=$(python -c "import json,sys; from llama_core.demo import demo_params; print(json.dumps(demo_params(*sys.argv[1:])))" "$url" "$out/work")
echo "== running DAG llama2_tiny_lora_demo (log: $out/dag-run.log)"
if ! airflow dags test llama2_tiny_lora_demo -c "$conf" >"$out/dag-run.log" 2>&1; then
  tail -n 60 "$out/dag-run.log"
  echo "demo FAILED: full log in $out/dag-run.log" >&2
  exit 1
fi
report=$(ls -t "$out"/work/runs/*/report.json | head -n 1)
echo
python -m llama_core.report "$report"
cat <<TXT

== done. To see this run's graph, task logs and each rank's log in the Airflow UI:
   make airflow             (Airflow with PostgreSQL, Redis and Celery workers; prints the URL and login)
   make airflow-demo        (this demo's pipeline through that Airflow's REST API)
TXT
