#!/usr/bin/env bash
# Install what hpc-jobs needs on a Debian/Ubuntu machine:
#   1. system packages (ffmpeg for the video benchmark, tmux for interactive tests, a compiler),
#   2. a virtualenv in .venv (python3 -m venv),
#   3. the project, editable, with the shipped workflows' ML stack and the dev tools
#      (pip install -e '.[workflows,dev]'), every version pinned by requirements/lock.txt,
#   4. torchsort, which is source-only and must be built after torch, without nvcc on PATH.
# The Slurm packages are not listed here: `python -m hpc_jobs.devcluster up` installs them.
#
# Idempotent, and fast (a few seconds) when everything is already installed.
# Environment: PYTHON (default python3), HPC_JOBS_VENV (default .venv in the checkout),
# HPC_JOBS_LOCK (default requirements/lock.txt; 'none': resolve freely, as scripts/lock.sh does).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=${HPC_JOBS_VENV:-$ROOT/.venv}
STAMP=$VENV/.hpc-jobs-install.stamp
LOCK=${HPC_JOBS_LOCK:-$ROOT/requirements/lock.txt}
constraints=()
if [[ $LOCK != none ]]; then
    [[ -f $LOCK ]] || { echo "install.sh: no lock file $LOCK (HPC_JOBS_LOCK=none resolves without one)" >&2; exit 2; }
    constraints=(-c "$LOCK")
fi

say() { printf '[install] %s\n' "$*"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------- system packages
t=$(now)
want=(ffmpeg tmux g++ chromium)
# A Debian system python needs these for venv and for building torchsort; pyenv's has them.
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || want+=(python3-venv)
"$PYTHON" - <<'EOF' 2>/dev/null || want+=(python3-dev)
import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
EOF
missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f '${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=()
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null || { echo "install.sh: need root (or sudo) to apt-get install ${missing[*]}" >&2; exit 2; }
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null || { echo "install.sh: need apt-get to install ${missing[*]}" >&2; exit 2; }
    say "apt-get install ${missing[*]}"
    apt() { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@"; }
    apt install -y -q --no-install-recommends "${missing[@]}" >/tmp/hpc-jobs-apt.log 2>&1 || {
        apt update -q >>/tmp/hpc-jobs-apt.log 2>&1
        apt install -y -q --no-install-recommends "${missing[@]}" >>/tmp/hpc-jobs-apt.log 2>&1 || {
            tail -20 /tmp/hpc-jobs-apt.log >&2; exit 1; }
    }
fi
say "system packages: $(elapsed "$t") s"

# ------------------------------------------------------------------------------- virtualenv
t=$(now)
if [[ ! -x $VENV/bin/python ]]; then
    say "creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
say "venv: $(elapsed "$t") s"

# ------------------------------------------------------------------------------- python packages
# The stamp records what was installed; when it matches and the modules are there, skip pip.
t=$(now)
fingerprint=$(cat setup.cfg setup.py pyproject.toml "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)
if [[ $LOCK != none ]]; then
    fingerprint="$fingerprint $(sha256sum <"$LOCK" | cut -d' ' -f1)"
fi
fingerprint="$fingerprint $ROOT"
modules=(hpc_jobs torch torchvision submitit torchsort pytest)
all_found="import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))"
if [[ -f $STAMP && $(cat "$STAMP") == "$fingerprint" ]] &&
    "$VENV/bin/python" -c "$all_found" "${modules[@]}" 2>/dev/null; then
    say "python packages already installed ($VENV)"
else
    rm -f "$STAMP"
    say "pip install -e '.[workflows,dev]' ${constraints[*]-} (torch is large: a few minutes the first time)"
    "$VENV/bin/python" -m pip install -q -e '.[workflows,dev]' ${constraints[@]+"${constraints[@]}"}

    # torchsort compiles a CUDA extension whenever `nvcc` is on PATH, and that fails on a machine
    # without a GPU toolkit that works. Hide nvcc, and only nvcc: each PATH directory holding one
    # is replaced by a temporary directory of links to everything else in it (python included).
    if ! "$VENV/bin/python" -c 'import torchsort' 2>/dev/null; then
        shadow=$(mktemp -d)
        trap 'rm -rf "$shadow"' EXIT
        build_path=
        IFS=: read -r -a dirs <<<"$PATH"
        for i in "${!dirs[@]}"; do
            d=${dirs[$i]}
            if [[ -n $d && -e $d/nvcc ]]; then
                mkdir -p "$shadow/$i"
                for f in "$d"/* "$d"/.[!.]*; do
                    [[ -e $f && $(basename "$f") != nvcc ]] && ln -s "$f" "$shadow/$i/"
                done
                d=$shadow/$i
            fi
            build_path=${build_path:+$build_path:}$d
        done
        say "building torchsort from source (no nvcc on PATH)"
        PATH=$build_path "$VENV/bin/python" -m pip install -q --no-build-isolation torchsort ${constraints[@]+"${constraints[@]}"}
    fi
    "$VENV/bin/python" -c "import $(IFS=,; echo "${modules[*]}")"  # a real import, once
    echo "$fingerprint" >"$STAMP"
fi
say "python packages: $(elapsed "$t") s"
