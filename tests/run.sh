#!/bin/sh
# Set up everything the test suite needs on a fresh Debian machine, then run it all:
# lint, types, unit tests, real-socket tests and the end-to-end tests with real clients.
# Usage (from the repository root, as root or with sudo rights for apt-get):
#     sh tests/run.sh
set -eu
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # shellcheck disable=SC2046
    $SUDO apt-get install -y -qq --no-install-recommends $(grep -v '^#' .ci/apt-packages.txt) >/dev/null
else
    echo "tests/run.sh: no apt-get here; end-to-end tests whose tools are missing are skipped" >&2
fi

PY=${PYTHON:-python3}
# Debian's own Python refuses system-wide pip installs (PEP 668); a venv keeps it clean.
managed=$($PY -c 'import os, sys, sysconfig
print(int(sys.prefix == sys.base_prefix and os.path.exists(
    os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')
if [ "$managed" = 1 ]; then
    [ -x .venv/bin/python ] || $PY -m venv .venv
    PY=.venv/bin/python
fi
$PY -m pip install -q --disable-pip-version-check -e '.[test]'

# npm end-to-end tests: verdaccio (a real registry), installed with npm into a cache folder
# outside the checkout and reused by later runs. 6.8.0 runs on Node 20 once node-fetch is
# held at 2.7.0. Without npm, or if the install fails, those tests skip themselves.
VERDACCIO_DIR=${PKGPROXY_VERDACCIO_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/pkgproxy-tests/verdaccio-6.8.0}
export PKGPROXY_VERDACCIO_DIR="$VERDACCIO_DIR"
if ! command -v npm >/dev/null 2>&1; then
    echo "tests/run.sh: no npm here; the npm end-to-end tests are skipped" >&2
elif [ ! -f "$VERDACCIO_DIR/node_modules/verdaccio/bin/verdaccio" ]; then
    mkdir -p "$VERDACCIO_DIR"
    printf '%s\n' '{"name": "pkgproxy-test-verdaccio", "version": "0.0.0", "private": true,' \
        ' "dependencies": {"verdaccio": "6.8.0"}, "overrides": {"node-fetch": "2.7.0"}}' \
        >"$VERDACCIO_DIR/package.json"
    # npm takes a variable named PROXY or proxy as its HTTP proxy.
    (cd "$VERDACCIO_DIR" && env -u PROXY -u proxy npm install --no-audit --no-fund \
        --loglevel=error --cache "$VERDACCIO_DIR/.npm-cache" >/dev/null) ||
        echo "tests/run.sh: verdaccio did not install; the npm end-to-end tests are skipped" >&2
fi

$PY -m ruff check pkgproxy tests twisted
$PY -m ruff format --check pkgproxy tests twisted
$PY -m mypy pkgproxy twisted
# The rooms and their one-way arrows (.importlinter, docs/architecture.md).
PYTHONPATH=. $PY -c "from importlinter.cli import lint_imports_command; lint_imports_command()" --no-cache

log=$(mktemp)
status=0
PYTHONPATH=. $PY -m twisted.trial --jobs 2 tests 2>&1 | tee "$log" || true
tail -n 1 "$log" | grep -q '^PASSED' || status=1
ran=$(sed -n 's/^Ran \([0-9]*\) tests.*/\1/p' "$log" | tail -n 1)
failed=$(sed -n 's/.*failures=\([0-9]*\).*/\1/p' "$log" | tail -n 1)
errors=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' "$log" | tail -n 1)
skipped=$(sed -n 's/.*skips=\([0-9]*\).*/\1/p' "$log" | tail -n 1)
bad=$(( ${failed:-0} + ${errors:-0} ))
echo "tests: $(( ${ran:-0} - bad - ${skipped:-0} )) passed, $bad failed, ${skipped:-0} skipped"
rm -f "$log"
[ "${ran:-0}" -gt 0 ] || status=1
exit $status
