#!/usr/bin/env bash
# The README's test command: fetches the default model if needed, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --release
