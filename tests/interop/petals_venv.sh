#!/usr/bin/env bash
# Build (or reuse) a separate virtualenv with real Petals 2.2.0.post1, for interop tests
# that run a genuine Petals server/client next to jaxseq.
#
# Usage: bash tests/interop/petals_venv.sh
#   Prints the path of the venv's python on its last stdout line and exits 0 when ready.
#   Exit 3 + a line "PETALS-VENV-UNAVAILABLE: <reason>" when the package index cannot be
#   reached (callers skip); exit 1 with the pip output tail on any other failure.
#
# Environment:
#   JAXSEQ_CACHE  cache root (default: $HOME/.cache/jaxseq); the venv lives in
#                 $JAXSEQ_CACHE/petals-2.2.0.post1-venv
#   PYTHON        interpreter to build the venv from (default: python3 on PATH)
#
# Why a separate venv: Petals 2.2 pins transformers<4.35, pydantic<2 and an old hivemind,
# which clash with jaxseq's own environment.
set -euo pipefail

readonly PETALS_VERSION="2.2.0.post1"
PYTHON_BIN="${PYTHON:-python3}"
CACHE_ROOT="${JAXSEQ_CACHE:-${HOME}/.cache/jaxseq}"
VENV="${CACHE_ROOT}/petals-${PETALS_VERSION}-venv"
MARKER="${VENV}/.jaxseq-petals-ready"
LOCK="${CACHE_ROOT}/petals-${PETALS_VERSION}-venv.lock"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SITECUSTOMIZE_SRC="${SCRIPT_DIR}/petals_sitecustomize.py"

# The install recipe, in three steps:
# 1. torch first, pinned: hivemind's "torch>=1.9" would otherwise pull the newest CUDA
#    build (several GB). 2.13.0 is the CPU build that lies on this machine's local index.
# 2. hivemind 1.1.12 instead of Petals' pin 1.1.10.post2 (an sdist whose build downloads
#    p2pd from the internet, which fails here; 1.1.12's wheel bundles p2pd), plus the rest
#    of Petals' dependencies at versions Petals 2.2 works with.
# 3. Petals itself and its two exotic deps with --no-deps, so pip does not try to
#    satisfy Petals' hivemind pin.
readonly TORCH_REQS=("torch==2.13.0")
readonly DEPS_REQS=(
    "hivemind==1.1.12" "numpy<2" "transformers==4.34.1" "tokenizers<0.15"
    "huggingface-hub<0.20" "accelerate<0.30" humanfriendly async-timeout sentencepiece
    Dijkstar cpufeature speedtest-cli safetensors "bitsandbytes==0.41.1" requests tqdm
)
readonly NODEPS_REQS=("petals==${PETALS_VERSION}" "tensor-parallel==1.0.23" "peft==0.5.0")
readonly SMOKE='import petals; from petals.cli import run_server'

log() { printf '[petals_venv] %s\n' "$*" >&2; }

die() { # die CODE MESSAGE...
    local code="$1"
    shift
    printf '%s\n' "$*" >&2
    exit "${code}"
}

if ! command -v "${PYTHON_BIN}" >/dev/null 2>&1; then
    die 1 "petals_venv: interpreter '${PYTHON_BIN}' not found (set PYTHON)"
fi
[[ -f "${SITECUSTOMIZE_SRC}" ]] || die 1 "petals_venv: missing ${SITECUSTOMIZE_SRC}"

# What the marker records: the recipe and the base interpreter. A different recipe or
# interpreter means a rebuild (venvs are tied to the interpreter that made them). The base
# prefix, not sys.executable: python3 may be some other venv's python that wraps the same base.
PY_ID="$("${PYTHON_BIN}" -c 'import sys; print(sys.base_prefix, sys.version.split()[0])')"
RECIPE="python=${PY_ID}
torch=${TORCH_REQS[*]}
deps=${DEPS_REQS[*]}
nodeps=${NODEPS_REQS[*]}"

mkdir -p "${CACHE_ROOT}"

# Serialise concurrent callers (e.g. two test sessions): the second waits for the
# first build instead of racing it in the same directory.
exec 9>"${LOCK}"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

install_sitecustomize() {
    local site
    site="$("${VENV}/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    cp "${SITECUSTOMIZE_SRC}" "${site}/sitecustomize.py"
}

smoke_test() {
    "${VENV}/bin/python" -c "${SMOKE}"
}

# Fast path: a finished build with the same recipe. The marker is written last, so its
# presence means the whole build and the smoke import succeeded.
if [[ -f "${MARKER}" ]] && [[ "$(cat "${MARKER}")" == "${RECIPE}" ]]; then
    site="$("${VENV}/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    if cmp -s "${SITECUSTOMIZE_SRC}" "${site}/sitecustomize.py"; then
        printf '%s\n' "${VENV}/bin/python"
        exit 0
    fi
    # Only the shim changed: refresh it and re-check instead of rebuilding everything.
    log "refreshing sitecustomize.py in ${VENV}"
    rm -f "${MARKER}"
    install_sitecustomize
    if smoke_test >&2; then
        printf '%s\n' "${RECIPE}" >"${MARKER}"
        printf '%s\n' "${VENV}/bin/python"
        exit 0
    fi
    log "smoke import failed after refreshing sitecustomize.py; rebuilding"
fi

# No (valid) marker: whatever is there is a half-built or outdated venv. Venvs are not
# relocatable (absolute shebangs), so we build in place and make the marker the commit point.
if [[ -e "${VENV}" ]]; then
    log "removing incomplete or outdated venv ${VENV}"
    rm -rf "${VENV}"
fi

PIP_LOG="$(mktemp "${CACHE_ROOT}/petals-venv-pip.XXXXXX.log")"
trap 'rm -f "${PIP_LOG}" "${PIP_LOG}.diag"' EXIT

# Network failures look like these in pip's output; on a failed pip run they mean
# "the index is unreachable" (exit 3, callers skip) rather than "the recipe is broken".
readonly NET_ERRORS='NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|Name or service not known|Network is unreachable|Connection refused|ConnectTimeoutError|ReadTimeoutError|Max retries exceeded|ProxyError|No route to host|ConnectionResetError|Could not fetch URL'

run_pip() { # run_pip STEP ARGS...: pip install into the venv, classify failures
    local step="$1"
    shift
    log "pip install (${step}): $*"
    if "${VENV}/bin/python" -m pip install --no-input --progress-bar off "$@" >"${PIP_LOG}" 2>&1; then
        return 0
    fi
    local net_log="${PIP_LOG}"
    if ! grep -Eq "${NET_ERRORS}" "${PIP_LOG}" && grep -q 'No matching distribution found' "${PIP_LOG}"; then
        # pip logs an unreachable index page only at debug level ("connection error"); the
        # visible "Retrying ..." warnings are absent when retries are off. So when nothing was
        # found, ask pip again, verbosely, whether it could reach the index at all.
        net_log="${PIP_LOG}.diag"
        "${VENV}/bin/python" -m pip install --no-input --progress-bar off -vv --retries 0 "$@" >"${net_log}" 2>&1 || true
    fi
    if grep -Eq "${NET_ERRORS}|connection error" "${net_log}"; then
        local reason
        reason="$(grep -Em1 "${NET_ERRORS}|connection error" "${net_log}" | cut -c1-300)"
        tail -n 30 "${PIP_LOG}" >&2
        rm -f "${PIP_LOG}.diag"
        die 3 "PETALS-VENV-UNAVAILABLE: package index unreachable during pip install (${step}): ${reason}"
    fi
    rm -f "${PIP_LOG}.diag"
    tail -n 60 "${PIP_LOG}" >&2
    die 1 "petals_venv: pip install (${step}) failed; see the output above"
}

start_s="${SECONDS}"
log "building ${VENV} with ${PY_ID} (about a minute from a local index, 1.6 GB)"
"${PYTHON_BIN}" -m venv "${VENV}" >&2 || die 1 "petals_venv: '${PYTHON_BIN} -m venv' failed"

run_pip torch "${TORCH_REQS[@]}"
run_pip deps "${DEPS_REQS[@]}"
run_pip petals --no-deps "${NODEPS_REQS[@]}"

install_sitecustomize
if ! smoke_test >"${PIP_LOG}" 2>&1; then
    tail -n 40 "${PIP_LOG}" >&2
    die 1 "petals_venv: smoke import failed: ${VENV}/bin/python -c '${SMOKE}'"
fi

# Commit point: only now is the venv declared ready.
printf '%s\n' "${RECIPE}" >"${MARKER}"
log "ready in $((SECONDS - start_s)) s"
printf '%s\n' "${VENV}/bin/python"
