#!/usr/bin/env bash
# Marco-o1's size on this machine: a 7B-shaped Qwen2 checkpoint (bf16, sharded, random weights)
# loaded as bf16, converted to Q8_0 and Q4_0 (first load converts into the cache, the second
# maps the cached file), then decode at batch 1 against llama.cpp's llama-bench on the very GGUF
# marco wrote, batched decode, and MCTS over 500 tokens. A developer tool, not CI (it writes
# ~30 GB and runs ~30-40 minutes on 2 cores). Prints a markdown table per part.
#
#   scripts/full-size.sh                  # DIR=/tmp/marco-qwen2-7b FORMATS="q8_0 q4_0"
#   PARTS=loads scripts/full-size.sh      # only the loads (PARTS=speed: only the speed parts)
#
# Needs llama-bench (benches/llamacpp/compare.sh builds it into ~/.cache/marco-llamacpp).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${DIR:-${TMPDIR:-/tmp}/marco-qwen2-7b}"
FORMATS="${FORMATS:-q8_0 q4_0}"
THREADS="${THREADS:-2}"
GEN="${GEN:-32}"
PARTS="${PARTS:-loads speed}"
LLAMA_BENCH="${LLAMA_BENCH:-$HOME/.cache/marco-llamacpp/build/bin/llama-bench}"
cargo build --release --quiet --example make_checkpoint --example generate --example convert \
  --example decode_bench --example batch_bench --example reason
bin=target/release/examples
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

[ -f "$DIR/config.json" ] || "$bin/make_checkpoint" --shape qwen2-7b --out "$DIR"
weights_gb=$(du -sb "$DIR" | awk '{printf "%.2f", $1/1e9}')

# Wall seconds and peak RSS (GB) of a command, from /usr/bin/time -v.
timed() {
  local out="$log/timed"
  /usr/bin/time -v "$@" > "$out.stdout" 2> "$out.stderr" || { cat "$out.stderr" >&2; return 1; }
  local wall rss
  wall=$(grep "Elapsed (wall clock)" "$out.stderr" | awk -F': ' '{n=split($2,t,":"); s=0; for(i=1;i<=n;i++) s=s*60+t[i]; printf "%.1f", s}')
  rss=$(grep "Maximum resident set size" "$out.stderr" | awk -F': ' '{printf "%.2f", $2/1048576}')
  echo "$wall $rss"
}
first_token=(--prompt-ids 1,2,3 --raw --max-tokens 1)

if [[ " $PARTS " == *" loads "* ]]; then
echo "## loads ($DIR: $weights_gb GB of bf16 safetensors)"
echo
echo "| format | what | wall s | peak RSS GB | held weights GB |"
echo "|---|---|---:|---:|---:|"
read -r wall rss < <(timed "$bin/generate" --model "$DIR" "${first_token[@]}")
echo "| bf16 | load + first token | $wall | $rss | $weights_gb |"
cache="${MARCO_HOME:-$HOME/.cache/marco}/converted"
for f in $FORMATS; do
  rm -f "$cache"/*-"$f".gguf
  read -r wall rss < <(timed "$bin/generate" --model "$DIR" --quantize "$f" "${first_token[@]}")
  size=$(ls -l "$cache"/*-"$f".gguf | awk '{printf "%.2f", $5/1e9}')
  echo "| $f | first load (converts into the cache) + first token | $wall | $rss | $size |"
  read -r wall rss < <(timed "$bin/generate" --model "$DIR" --quantize "$f" "${first_token[@]}")
  echo "| $f | second load (cached file) + first token | $wall | $rss | $size |"
  read -r wall rss < <(timed "$bin/convert" --model "$DIR" --to "$f" --out "$DIR.$f.gguf")
  echo "| $f | convert example (writes $DIR.$f.gguf) | $wall | $rss | $size |"
done
fi
[[ " $PARTS " == *" speed "* ]] || exit 0

for f in $FORMATS; do
  gguf="$DIR.$f.gguf"
  echo
  echo "## decode at batch 1, $f ($GEN tokens after a 16-token prompt; 3 alternating rounds)"
  echo
  echo "| round | marco tok/s | llama.cpp tok/s | ratio |"
  echo "|---:|---:|---:|---:|"
  for round in 1 2 3; do
    marco=$("$bin/decode_bench" --model "$gguf" --paths kernel --prompt-tokens 16 --gen-tokens "$GEN" --runs 1 \
      | awk -F'|' '/^\| marco/ {gsub(/ /,"",$6); print $6}')
    llama=$("$LLAMA_BENCH" -m "$gguf" -p 0 -n "$GEN" -t "$THREADS" -r 1 --repack 0 -o csv 2>/dev/null \
      | awk -F',' 'NR>1 {gsub(/"/,"",$0); print $(NF-1)}' | tail -1)
    echo "| $round | $marco | $llama | $(awk -v a="$marco" -v b="$llama" 'BEGIN{printf "%.2f", a/b}') |"
  done
  echo
  echo "## batched decode, $f"
  echo
  "$bin/batch_bench" --model "$gguf" --batches 1,8 --prompt-tokens 16 --gen-tokens 16 --runs 2
  echo
  echo "## MCTS over 500 tokens, $f"
  echo
  "$bin/reason" --model "$gguf" --policy mcts --granularity mini-step:32 --width 3 --budget-tokens 500 \
    --seed 1 "What is 12 times 7?" 2>&1 | tail -2
done
