#!/usr/bin/env bash
# The NEON kernels, checked on an x86-64 machine: cross-compiles marco-backend-cpu for
# aarch64-unknown-linux-gnu and runs its tests under qemu's user-mode emulator, twice:
#   * QEMU_CPU=max         FEAT_DotProd present: the kernels take `sdot` (Isa::NeonDotprod);
#   * QEMU_CPU=cortex-a53  plain ARMv8.0 NEON: the `smull`/`sadalp` path (Isa::Neon), and run-time
#                          detection must not pick `sdot` (it would die with SIGILL).
# The tests compare every NEON kernel with the portable definition (bit for bit where the
# definition says so) and the whole matmul with an f64 reference. qemu says nothing about speed.
#
# Needs the aarch64 Rust standard library (rustup), a cross linker and qemu-user; installs them
# where it can (Debian: gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user).
#   scripts/aarch64-check.sh              install what is missing, then check (fails if it can't)
#   scripts/aarch64-check.sh --if-able    skip with a message when the tools can't be installed
#   AARCH64_MODEL_TESTS=1 scripts/aarch64-check.sh
#                                         also the llama.cpp oracle and the tree-cache tests on
#                                         the default model under qemu (~15 minutes)
# Every run also checks the whole model on NEON against the Hugging Face oracle (tiny Qwen2 and
# Llama checkpoints: logits within 1e-3, top-5 and greedy continuations identical, through
# burn's plain ops and through the kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
if_able=false
[[ "${1:-}" == "--if-able" ]] && if_able=true

unavailable() {
    if $if_able; then
        echo "aarch64-check: SKIPPED, $1 (the NEON kernels were not tested in this run)"
        exit 0
    fi
    echo "aarch64-check: $1" >&2
    exit 1
}

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    rustup target add "$target" >/dev/null 2>&1 || unavailable "cannot install the $target standard library (rustup target add)"
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    { $sudo apt-get install -y -q gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null 2>&1 \
        || { $sudo apt-get update -q >/dev/null 2>&1 \
            && $sudo apt-get install -y -q gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null 2>&1; }; } \
        || unavailable "cannot install gcc-aarch64-linux-gnu and qemu-user (apt-get)"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++

echo "== aarch64 clippy (marco-backend-cpu)"
cargo clippy -p marco-backend-cpu --all-targets --target "$target" -- -D warnings
for cpu in max cortex-a53; do
    echo "== aarch64 tests (marco-backend-cpu), QEMU_CPU=$cpu"
    QEMU_CPU=$cpu cargo test -p marco-backend-cpu --release --target "$target"
done
echo "== aarch64 Hugging Face oracle (marco-model), QEMU_CPU=max"
QEMU_CPU=max cargo test -p marco-model --release --target "$target" --test hf_oracle
if [[ "${AARCH64_MODEL_TESTS:-0}" == 1 ]]; then
    echo "== aarch64 default-model tests, QEMU_CPU=max"
    QEMU_CPU=max cargo test -p marco-model --release --target "$target" --test tree_cache --test llamacpp_oracle
fi
echo "aarch64-check: ok"
