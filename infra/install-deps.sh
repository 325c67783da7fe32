#!/usr/bin/env bash
# Installs canvasflow's dependencies on a cluster node or into an image: the packages of pyproject.toml's
# [project].dependencies at the versions of constraints.txt, plus torch 2.13.0's default PyPI build, which on
# Linux x86_64 is the CUDA 13.0 build (it needs an NVIDIA driver >= 580 on GPU nodes; on CPU-only nodes it
# runs on the CPU). Used by infra/docker/Dockerfile and by infra/ray/cluster-aws.yaml's setup_commands.
#
#   bash infra/install-deps.sh                  # the checkout this script lives in
#   bash infra/install-deps.sh /path/to/dir     # a directory holding pyproject.toml and constraints.txt
#
# The project's code is not installed: a job brings it (`ray job submit --working-dir .`, or the copy in the
# image), so a node never runs a stale copy.
#
# triton is never pinned here: torch's CUDA wheels pin the triton release they were built with (torch 2.13.0
# requires triton 3.7.1), so GPU nodes take torch's own; a triton line in constraints.txt would be dropped.
#
# Settings (environment): PYTHON (python3, else python), CANVASFLOW_TORCH (torch==2.13.0; e.g. a CUDA 12
# build from PyTorch's own index for nodes with an older driver), PIP_EXTRA (more pip arguments, e.g.
# "--index-url https://..."), DRY_RUN=1 (print the requirements and the pip command, install nothing).
set -euo pipefail

ROOT="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python || true)}"
TORCH="${CANVASFLOW_TORCH:-torch==2.13.0}"

die() { echo "install-deps: $*" >&2; exit 1; }

[[ -n "$PYTHON" ]] || die "no python3 or python on PATH; set PYTHON=/path/to/python"
[[ -f "$ROOT/pyproject.toml" ]] || die "$ROOT/pyproject.toml not found"
[[ -f "$ROOT/constraints.txt" ]] || die "$ROOT/constraints.txt not found"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$PYTHON" - "$ROOT/pyproject.toml" >"$tmp/requirements.txt" <<'EOF' || die "cannot read the dependencies of pyproject.toml"
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        sys.exit("install-deps: Python >= 3.11 (tomllib) or the tomli package is needed to read pyproject.toml")
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
grep -v -E '^triton[[:space:]]*==' "$ROOT/constraints.txt" >"$tmp/constraints.txt"

# PIP_EXTRA is split on whitespace on purpose (several arguments).
# shellcheck disable=SC2206
extra=(${PIP_EXTRA:-})
command=("$PYTHON" -m pip install --no-cache-dir -c "$tmp/constraints.txt" "$TORCH" -r "$tmp/requirements.txt" "${extra[@]}")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "# requirements (pyproject.toml [project].dependencies):"
    cat "$tmp/requirements.txt"
    echo "# constraints (constraints.txt without triton):"
    cat "$tmp/constraints.txt"
    echo "# command:"
    echo "${command[*]}"
    exit 0
fi
echo "install-deps: ${command[*]}" >&2
"${command[@]}"
