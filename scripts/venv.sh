# Sourced by scripts/run and scripts/test: make ./.venv (once) and install the given
# requirements file into it whenever that file (or what it includes) changes.
# A stock machine refuses a system-wide `pip install` (PEP 668), hence the virtual environment.
set -euo pipefail

ensure_venv() {
    local requirements="$1"
    local python="${PYTHON:-python3}"
    if ! command -v "$python" >/dev/null 2>&1; then
        echo "error: $python not found; Callgate needs Python 3.11 or newer" >&2
        exit 1
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "error: Callgate needs Python 3.11 or newer ($python is $("$python" -V 2>&1))" >&2
        exit 1
    fi
    if [ ! -x .venv/bin/python ]; then
        echo "creating the virtual environment in .venv ..." >&2
        if ! "$python" -m venv .venv; then
            rm -rf .venv
            echo "error: '$python -m venv' failed; on Debian/Ubuntu install python3-venv first" >&2
            exit 1
        fi
    fi
    local stamp=.venv/.requirements.sha256
    local want
    want=$(cat requirements*.txt | sha256sum | cut -d' ' -f1)-$requirements
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "installing $requirements into .venv ..." >&2
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
        echo "$want" > "$stamp"
    fi
}
