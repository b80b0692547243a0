#!/usr/bin/env bash
# How far is the llama.cpp oracle from llama.cpp itself? (a developer tool, not CI)
#
#   benches/llamacpp/oracle_noise.sh
#
# Teacher-forces the cases of marco-model/tests/data/llamacpp/ through
# - llama.cpp as the oracle was made (f16 KV cache; it must reproduce the oracle: mean 0),
# - llama.cpp with an f32 KV cache, and with flash attention (both at least as exact),
# - marco's linear paths `kernel` (8-bit activations) and `kernel-exact` (f32 activations),
# and prints, for each, the mean |Δ log-prob| over the oracle's top-5 ids (those also in the
# run's own top-5: the runs report five per step) and the steps where the
# top-1 differs although the oracle's top-1 leads by more than 0.2 nats. The llama.cpp build
# is compare.sh's (cached in $LLAMACPP_CACHE, default ~/.cache/marco-llamacpp).
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE="${LLAMACPP_CACHE:-$HOME/.cache/marco-llamacpp}"
PY="${MARCO_PYTHON:-python3}"
BIN="$CACHE/build/bin"
SRC="$CACHE/src/vendor/llama.cpp"
ORACLE=marco-model/tests/data/llamacpp/smollm2-135m-instruct-q4_1.json
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [ ! -f "$BIN/libllama.so" ] || [ ! -d "$SRC/include" ]; then
  echo "llama.cpp is not built in $CACHE: run benches/llamacpp/compare.sh once first" >&2
  exit 1
fi
c++ -O2 -std=c++17 benches/llamacpp/teacher_force.cpp -I"$SRC/include" -I"$SRC/ggml/include" \
  -L"$BIN" -lllama -lggml -lggml-base -Wl,-rpath,"$BIN" -o "$WORK/teacher_force"

cargo build --release -q --example generate >&2
Q41="${MARCO_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/marco}/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$Q41" ] || ./target/release/examples/generate --prompt-ids 1 --raw --max-tokens 1 >/dev/null

"$PY" - "$ORACLE" "$WORK/cases.tsv" <<'PYEOF'
import json, sys
cases = json.load(open(sys.argv[1]))["cases"]
with open(sys.argv[2], "w") as f:
    for c in cases:
        f.write("\t".join([c["name"], ",".join(map(str, c["token_ids"])), ",".join(map(str, c["greedy_ids"]))]) + "\n")
PYEOF

"$WORK/teacher_force" "$Q41" "$WORK/cases.tsv" >"$WORK/llama.cpp.json" 2>/dev/null
KV_F32=1 "$WORK/teacher_force" "$Q41" "$WORK/cases.tsv" >"$WORK/llama.cpp-kv-f32.json" 2>/dev/null
FA=1 "$WORK/teacher_force" "$Q41" "$WORK/cases.tsv" >"$WORK/llama.cpp-flash-attn.json" 2>/dev/null

for path in kernel kernel-exact; do
  out="$WORK/marco-$path.json"
  {
    echo "["
    first=1
    while IFS=$'\t' read -r name ids forced; do
      [ "$first" = 1 ] || echo ","
      first=0
      ./target/release/examples/generate --linear-path "$path" --prompt-ids "$ids" --raw \
        --force-ids "$forced" --top-logprobs 5 --json 2>/dev/null |
        "$PY" -c 'import json, sys
d = json.load(sys.stdin)
print(json.dumps({"name": sys.argv[1], "steps": [{"ids": [t[0] for t in s["top"]], "lp": [t[1] for t in s["top"]]} for s in d["steps"]]}))' "$name"
    done <"$WORK/cases.tsv"
    echo "]"
  } >"$out"
done

"$PY" - "$ORACLE" "$WORK" <<'PYEOF'
import json, sys
oracle = json.load(open(sys.argv[1]))["cases"]
print(f"{'run':<24} {'mean |Δ|':>9} {'max |Δ|':>8}  top-1 differs where the oracle leads by > 0.2 nats")
for run in ["llama.cpp", "llama.cpp-kv-f32", "llama.cpp-flash-attn", "marco-kernel", "marco-kernel-exact"]:
    got = json.load(open(f"{sys.argv[2]}/{run}.json"))
    total, count, worst, flips = 0.0, 0, 0.0, []
    for case, mine in zip(oracle, got):
        assert len(case["steps"]) == len(mine["steps"]), run
        for i, (o, m) in enumerate(zip(case["steps"], mine["steps"])):
            lp = dict(zip(m["ids"], m["lp"]))
            for tid, ref in zip(o["top5_ids"], o["top5_logprobs"]):
                if tid in lp:  # marco reports only its own top-5 here
                    d = abs(lp[tid] - ref); total += d; count += 1; worst = max(worst, d)
            lead = o["top5_logprobs"][0] - o["top5_logprobs"][1]
            if lead > 0.2 and m["ids"][0] != o["top5_ids"][0]:
                flips.append(f"{case['name']}#{i} ({lead:.3f})")
    print(f"{run:<24} {total / count:>9.4f} {worst:>8.4f}  {', '.join(flips) or '-'}")
PYEOF
