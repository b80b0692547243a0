#!/usr/bin/env bash
# marco vs llama.cpp on the same GGUF files, same machine, same run (a developer tool, not CI).
#
#   benches/llamacpp/compare.sh            # prefill 128 / decode 128, 2 threads, 5 repetitions,
#                                          # 3 alternating rounds (REPS=, ROUNDS=, THREADS=)
#
# llama.cpp comes from the PyPI sdist of llama-cpp-python (it vendors llama.cpp); only
# llama-bench and llama-quantize are built (cmake from PyPI if the machine has none), and the
# build is cached outside the repo in $LLAMACPP_CACHE (default ~/.cache/marco-llamacpp).
# An F32 copy of the default model is made with llama-quantize --allow-requantize.
# The last line is machine-readable:
#   ratios prefill_f32=R decode_f32=R prefill_q4_1=R decode_q4_1=R
set -euo pipefail
cd "$(dirname "$0")/../.."
LLAMACPP_VERSION="${LLAMACPP_VERSION:-0.3.36}"
CACHE="${LLAMACPP_CACHE:-$HOME/.cache/marco-llamacpp}"
THREADS="${THREADS:-2}"
REPS="${REPS:-5}"
ROUNDS="${ROUNDS:-3}"
mkdir -p "$CACHE"
PY="${MARCO_PYTHON:-python3}"

if ! command -v cmake >/dev/null 2>&1; then
  "$PY" -m pip install -q cmake ninja >&2
fi

BIN="$CACHE/build/bin"
if [ ! -x "$BIN/llama-bench" ] || [ ! -x "$BIN/llama-quantize" ]; then
  echo "== building llama.cpp (llama-cpp-python $LLAMACPP_VERSION sdist) in $CACHE" >&2
  if ! ls "$CACHE"/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    # Only llama-cpp-python itself as an sdist; its build tools may come as wheels.
    "$PY" -m pip download -q --no-deps --no-binary=llama-cpp-python "llama-cpp-python==$LLAMACPP_VERSION" -d "$CACHE" >&2
  fi
  rm -rf "$CACHE/src" && mkdir -p "$CACHE/src"
  tar -xzf "$CACHE"/llama_cpp_python-*.tar.gz -C "$CACHE/src" --strip-components=1
  cmake -S "$CACHE/src/vendor/llama.cpp" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON >&2
  cmake --build "$CACHE/build" --config Release -j "$(nproc)" --target llama-bench llama-quantize >&2
fi

echo "== default model" >&2
cargo build --release -q --example decode_bench >&2
# The default model, fetched and verified by marco itself.
Q41="${MARCO_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/marco}/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$Q41" ] || cargo run --release -q --example decode_bench -- --runs 1 --prompt-tokens 8 --gen-tokens 1 --paths kernel >/dev/null
F32="$CACHE/SmolLM2-135M-Instruct.F32.gguf"
if [ ! -f "$F32" ]; then
  "$BIN/llama-quantize" --allow-requantize "$Q41" "$F32" F32 >&2
fi

run_llama() { # file -> "prefill decode" tok/s
  "$BIN/llama-bench" -m "$1" -p 128 -n 128 -t "$THREADS" -r "$REPS" -o json 2>/dev/null |
    "$PY" -c 'import json,sys
rows=json.load(sys.stdin); p=[r["avg_ts"] for r in rows if r["n_prompt"]>0]; d=[r["avg_ts"] for r in rows if r["n_gen"]>0]
print(f"{p[0]:.1f} {d[0]:.1f}")'
}
run_marco() { # file -> "prefill decode" tok/s (the kernel row of decode_bench's table)
  MARCO_THREADS="$THREADS" cargo run --release -q --example decode_bench -- --model "$1" --prompt-tokens 128 \
    --gen-tokens 128 --runs "$REPS" --paths kernel | tee /dev/stderr |
    awk -F'|' '/^\| / && $2 !~ /linear path/ {gsub(/ /, "", $5); gsub(/ /, "", $6); print $5, $6; exit}'
}

# This machine's memory bandwidth drifts by tens of percent over minutes (other tenants), so
# the engines alternate: ROUNDS rounds of (llama.cpp, marco) on each file, medians per engine.
median() { "$PY" -c 'import statistics, sys; print(f"{statistics.median(map(float, sys.argv[1:])):.1f}")' "$@"; }
declare -a LP32s LD32s LP41s LD41s MP32s MD32s MP41s MD41s
for round in $(seq "$ROUNDS"); do
  echo "== round $round of $ROUNDS" >&2
  read -r p d < <(run_llama "$F32"); LP32s+=("$p"); LD32s+=("$d")
  read -r p d < <(run_marco "$F32"); MP32s+=("$p"); MD32s+=("$d")
  read -r p d < <(run_llama "$Q41"); LP41s+=("$p"); LD41s+=("$d")
  read -r p d < <(run_marco "$Q41"); MP41s+=("$p"); MD41s+=("$d")
done
LP32=$(median "${LP32s[@]}"); LD32=$(median "${LD32s[@]}"); LP41=$(median "${LP41s[@]}"); LD41=$(median "${LD41s[@]}")
MP32=$(median "${MP32s[@]}"); MD32=$(median "${MD32s[@]}"); MP41=$(median "${MP41s[@]}"); MD41=$(median "${MD41s[@]}")
echo "per round (llama.cpp / marco): F32 decode ${LD32s[*]} / ${MD32s[*]}; Q4_1 decode ${LD41s[*]} / ${MD41s[*]}" >&2
ratio() { "$PY" -c "print(f'{$1/$2:.2f}')"; }
printf '\n%-8s %-8s %14s %14s %8s\n' model phase "llama.cpp t/s" "marco t/s" ratio
printf '%-8s %-8s %14s %14s %8s\n' F32 prefill "$LP32" "$MP32" "$(ratio "$MP32" "$LP32")"
printf '%-8s %-8s %14s %14s %8s\n' F32 decode "$LD32" "$MD32" "$(ratio "$MD32" "$LD32")"
printf '%-8s %-8s %14s %14s %8s\n' Q4_1 prefill "$LP41" "$MP41" "$(ratio "$MP41" "$LP41")"
printf '%-8s %-8s %14s %14s %8s\n' Q4_1 decode "$LD41" "$MD41" "$(ratio "$MD41" "$LD41")"
echo "ratios prefill_f32=$(ratio "$MP32" "$LP32") decode_f32=$(ratio "$MD32" "$LD32") prefill_q4_1=$(ratio "$MP41" "$LP41") decode_q4_1=$(ratio "$MD41" "$LD41")"
