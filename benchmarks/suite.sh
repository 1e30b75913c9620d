#!/usr/bin/env bash
# Runs a list of benchmark-phase settings one after another and appends each result (one JSON
# object per line) to $1. Each further argument is a `configs/benchmark.py:` argument string:
#   bash benchmarks/suite.sh results.jsonl "model=mae,variant=B/16,batch=256,bf16=True" ...
set -uo pipefail
out=$1; shift
work=$(mktemp -d)
for spec in "$@"; do
  echo "== $spec" >&2
  rm -f "$work/benchmark.json"
  if "${PYTHON:-python}" -m wsss_jax.main --config="configs/benchmark.py:$spec" --workdir="$work" >&2; then
    "${PYTHON:-python}" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))" \
      "$work/benchmark.json" >> "$out"
  else
    echo "{\"spec\": \"$spec\", \"failed\": true}" >> "$out"
  fi
done
