#!/usr/bin/env bash
# Refresh requirements/lock.txt: the exact version of every Python package scripts/install.sh
# installs (the core, the ML stack of the shipped workflows with torch, torchsort, the dev tools).
# install.sh passes the file to pip as constraints (-c), so CI and every fresh install get exactly
# these versions; a new release of deepspeed, timm or faiss changes nothing until the lock does.
#
#   bash scripts/lock.sh            resolve anew: install.sh without the lock into a scratch venv
#                                   (downloads everything, torch included: minutes), then freeze it
#   bash scripts/lock.sh --freeze   freeze .venv as it is (after upgrading a package there by hand)
#
# Then run the tests against it (bash .ci/run) and commit requirements/lock.txt.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOCK=requirements/lock.txt

if [[ ${1:-} == --freeze ]]; then
    venv=${HPC_JOBS_VENV:-$PWD/.venv}
elif [[ -z ${1:-} ]]; then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    venv=$scratch/venv
    echo "[lock] resolving anew in $venv (install.sh without the lock)"
    HPC_JOBS_VENV=$venv HPC_JOBS_LOCK=none bash scripts/install.sh
else
    echo "usage: bash scripts/lock.sh [--freeze]" >&2
    exit 2
fi

mkdir -p "$(dirname "$LOCK")"
{
    echo "# The exact versions scripts/install.sh installs (pip constraints: pip install -c $LOCK)."
    echo "# Written by scripts/lock.sh from $("$venv/bin/python" --version 2>&1) on $(uname -m); refresh with"
    echo "# 'bash scripts/lock.sh' (a fresh resolve) or 'bash scripts/lock.sh --freeze' (.venv as it is)."
    "$venv/bin/python" -m pip freeze --exclude-editable | grep -v -i -E '^hpc[-_]jobs( |=|@)' | LC_ALL=C sort -f
} >"$LOCK.tmp"
mv "$LOCK.tmp" "$LOCK"
echo "[lock] $LOCK: $(grep -c '==' "$LOCK") packages pinned"
