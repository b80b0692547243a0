#!/usr/bin/env bash
# The recompute and batching bounds on prompts and configurations the tests do not use: runs `reason` on the default
# model for 5 questions × 11 search configurations (MCTS, beam, greedy+reflection; token, line,
# step and mini-step edges; widths 2–6; reflection; temperatures; node budgets) and checks, from
# each trace's statistics, that tokens computed ÷ distinct tokens ≤ 1.01 and KV bytes in use ≤
# 1.25 × distinct tokens × bytes per token. Prints one line per run; exits 1 if any run fails.
#
#   scripts/recompute-sweep.sh            # ~1 minute after the build
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --example reason --quiet
reason=target/release/examples/reason
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
questions=(
    "Tom reads 12 pages a day. How many pages does he read in 9 days?"
    "What is the capital of France, and why is it famous?"
    "Write a haiku about autumn leaves."
    "A train travels 60 km in 45 minutes. What is its speed in km/h?"
    "¿Cuántos días tiene una semana? Explica."
)
configs=(
    "--policy mcts --granularity mini-step:32 --width 4 --budget-tokens 256"
    "--policy mcts --granularity mini-step:64 --width 2 --budget-tokens 400 --reflect"
    "--policy mcts --granularity token --width 3 --budget-tokens 60"
    "--policy mcts --granularity step --width 3 --budget-tokens 300 --answer-rule best-value"
    "--policy mcts --granularity line --width 5 --budget-tokens 300 --max-depth 4 --temperature 1.2"
    "--policy beam --granularity line --width 4 --budget-tokens 300"
    "--policy beam --granularity mini-step:16 --width 2 --budget-tokens 200 --reflect"
    "--policy beam --granularity token --width 6 --budget-tokens 90"
    "--policy greedy --reflect --budget-tokens 300"
    "--policy greedy --granularity mini-step:8 --budget-tokens 100 --temperature 0.9"
    "--policy mcts --granularity line --width 3 --budget-nodes 12 --budget-tokens 1000"
)
run=0
failed=0
for question in "${questions[@]}"; do
    for config in "${configs[@]}"; do
        run=$((run + 1))
        # shellcheck disable=SC2086 # `config` is a list of options
        if ! "$reason" $config --seed $((run * 7)) --trace "$out/$run.json" "$question" >"$out/$run.txt" 2>&1; then
            echo "run $run: reason failed ($config): $(tail -1 "$out/$run.txt")"
            failed=1
            continue
        fi
        python3 - "$out/$run.json" "$run" "$config" <<'PY' || failed=1
import json, sys
path, run, config = sys.argv[1:]
s = json.load(open(path))["stats"]
distinct = s["distinct_tokens"]
ratio = s["tokens_computed"] / distinct
kv = s["kv_bytes_in_use"] / (distinct * s["kv_bytes_per_token"])
ok = ratio <= 1.01 and kv <= 1.25
print(f"run {run}: {s['tokens_computed']} computed / {distinct} distinct = {ratio:.4f}, "
      f"KV {kv:.3f} × distinct, {s['nodes']} nodes ({config}){'' if ok else '  FAILED'}")
sys.exit(0 if ok else 1)
PY
    done
done
[ "$failed" = 0 ] && echo "recompute-sweep: all $run runs hold" || { echo "recompute-sweep: FAILED"; exit 1; }
