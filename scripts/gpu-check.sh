#!/usr/bin/env bash
# CUDA checks, built here and run on a GPU machine.
#
#   scripts/gpu-check.sh build   # here (no GPU, no CUDA toolkit needed): builds the CUDA test
#                                # binaries and the decode benchmark into gpu-bundle/ (xz)
#   scripts/gpu-check.sh run     # on the GPU machine, in the repository root (no network
#                                # needed, no cargo needed): runs the CUDA tests and the decode
#                                # benchmark from gpu-bundle/, prints everything, < 8 minutes
#                                # (gpu-bundle/ is git-ignored: a device run that copies the
#                                # working tree must be told to carry it)
#   scripts/gpu-check.sh         # both, on a machine that has cargo and a GPU
#
# `run` unpacks the binaries into $MARCO_GPU_BIN (default: a fresh temporary folder); where
# gpu-bundle/ is absent but $MARCO_GPU_BIN already holds them (a second run on the same
# machine), it uses those.
#
# The tests skip with "skipping: no CUDA driver" where no driver is found, so `run` also works
# (and says so) on a machine without a GPU. The decode benchmark needs a model file: it uses
# $MARCO_GPU_MODEL if set, else the default model if it is in marco's cache ($MARCO_HOME or
# ~/.cache/marco), else a random-weight model with the default model's shape.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=gpu-bundle
mode="${1:-all}"

build() {
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"
    # Only what the GPU run needs, stripped and xz-compressed (a device's whole working tree
    # travels within 64 MiB): the CUDA oracle tests, the driver probe's tests, the benchmark.
    local exes
    exes=$(
        cargo test --release -p marco-model --features cuda --test hf_oracle --no-run --message-format=json
        cargo test --release -p marco-model --features cuda --test tree_cache --no-run --message-format=json
        cargo test --release -p marco-backend-cuda --features cuda --lib --no-run --message-format=json
    )
    echo "$exes" | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | while read -r exe; do
        strip -o "$BUNDLE/test-$(basename "$exe")" "$exe"
    done
    cargo build --release --features cuda --example decode_bench
    strip -o "$BUNDLE/decode_bench" target/release/examples/decode_bench
    # Batched decode (see run_batch_bench below).
    cargo build --release --features cuda --example batch_bench
    strip -o "$BUNDLE/batch_bench" target/release/examples/batch_bench
    # Forked and batched states against each sequence alone, on a few prompts (the default model).
    cargo build --release --features cuda --example fork_check
    strip -o "$BUNDLE/fork_check" target/release/examples/fork_check
    xz -T0 -6 "$BUNDLE"/*
    ls -la "$BUNDLE"
}

run() {
    local bin="${MARCO_GPU_BIN:-}"
    [ -n "$bin" ] || bin=$(mktemp -d)
    mkdir -p "$bin"
    if [ -d "$BUNDLE" ]; then
        for f in "$BUNDLE"/*.xz; do xz -dc "$f" >"$bin/$(basename "${f%.xz}")"; done
    elif [ ! -x "$bin/batch_bench" ]; then
        echo "no $BUNDLE/: run 'scripts/gpu-check.sh build' first" >&2
        exit 1
    fi
    chmod +x "$bin"/*
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    status=0
    # The tests find their data under tests/data relative to the crate directory.
    for t in "$bin"/test-*; do
        echo "== $(basename "$t")"
        (cd marco-model && timeout 300 "$t" --test-threads 1 --nocapture cuda probe) || status=1
    done
    model="${MARCO_GPU_MODEL:-}"
    cache="${MARCO_HOME:-$HOME/.cache/marco}"
    if [ -z "$model" ] && [ -f "$cache/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
        model="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
    fi
    echo "== decode benchmark (CUDA)"
    if [ -n "$model" ]; then
        timeout 240 "$bin/decode_bench" --model "$model" --runs 3 || status=1
    else
        echo "(no model file: random weights with the default model's shape)"
        timeout 240 "$bin/decode_bench" --random smollm2-135m --runs 3 || status=1
    fi
    run_fork_check "$bin" "$model" || status=1
    run_batch_bench "$bin" "$model" || status=1
    exit $status
}

# ---- Forks against each sequence alone, on CUDA -----------------------------------------
# Up to 24 forks of each prompt, ragged appends, sampled batched steps and a reflected re-fork;
# every leaf's logits against its whole sequence prefilled alone, bit for bit (f32 on CUDA is
# batch invariant). Needs the real model (a tokenizer); ~30 s.
run_fork_check() {
    local bin="$1" model="$2"
    echo "== forked vs alone on chosen prompts (CUDA)"
    if [ -z "$model" ]; then
        echo "(no model file: skipped)"
        return 0
    fi
    [ -x "$bin/fork_check" ] || { echo "(no fork_check in the bundle: skipped)"; return 0; }
    timeout 120 "$bin/fork_check" --model "$model" --forks 24 --steps 12 --tolerance 0 \
        "What is 17 times 23? Think step by step." "Name three prime numbers and explain why." \
        "A train leaves at 3 pm going 60 miles per hour; when has it gone 150 miles?"
}

# ---- Batched decode on CUDA ------------------------------------------------------------
# Aggregate decode tok/s with 1, 8 and 32 sequences stepping together (forks of one shared
# prompt, ragged lengths), for the default model (or a random-weight model of its shape) and
# for a random-weight Qwen2 with Marco-o1's 7B shape (hidden 3584, 28 layers, 28/4 heads,
# intermediate 18944, vocab 152064) in bf16 (~15 GB of weights, as Marco-o1's checkpoint);
# f32 (~30 GB) only if bf16 fails. ~3 minutes.
run_batch_bench() {
    local bin="$1" model="$2" status=0
    echo "== batched decode (CUDA): default model"
    if [ -n "$model" ]; then
        timeout 120 "$bin/batch_bench" --model "$model" --batches 1,8,32 --gen-tokens 32 --runs 3 || status=1
    else
        timeout 120 "$bin/batch_bench" --random smollm2-135m --batches 1,8,32 --gen-tokens 32 --runs 3 || status=1
    fi
    if [ -n "${MARCO_GPU_SKIP_7B:-}" ]; then
        echo "== (MARCO_GPU_SKIP_7B set: no 7B-shape run)"
        return $status
    fi
    echo "== batched decode (CUDA): random-weight Qwen2, Marco-o1's 7B shape, bf16"
    if ! timeout 200 "$bin/batch_bench" --random qwen2-7b --dtype bf16 --batches 1,8,32 --prompt-tokens 32 \
        --gen-tokens 16 --runs 3; then
        status=1
        echo "== batched decode (CUDA): random-weight Qwen2, Marco-o1's 7B shape, f32 (bf16 failed)"
        timeout 200 "$bin/batch_bench" --random qwen2-7b --batches 1,8,32 --prompt-tokens 32 --gen-tokens 16 \
            --runs 1 || status=1
    fi
    return $status
}

case "$mode" in
    build) build ;;
    run) run ;;
    all) build && run ;;
    *) echo "usage: $0 [build|run|all]" >&2; exit 2 ;;
esac
