#!/usr/bin/env bash
# The whole test suite: fast tests first, then the slow ones (debootstrap, boot).
# Extra arguments go to both pytest runs.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash scripts/setup.sh
export LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg

status=0
echo "test: not slow"
.venv/bin/python -m pytest tests -m "not slow" "$@" || status=$?
if ((status == 5)); then
    echo "test: no fast tests collected" >&2
fi

echo "test: slow"
slow=0
.venv/bin/python -m pytest tests -m slow "$@" || slow=$?
if ((slow == 5)); then
    # Exit 5 = nothing collected.  Fine only if the suite really has no slow tests.
    if .venv/bin/python -m pytest tests -m slow --collect-only -q -p no:cacheprovider 2>/dev/null \
            | grep -q '::'; then
        echo "test: slow tests exist but none ran" >&2
    else
        echo "test: no slow tests"
        slow=0
    fi
fi
if ((status == 0)); then status=$slow; fi
echo "test: exit $status"
exit "$status"
