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

$PY -m ruff check pkgproxy tests twisted
$PY -m ruff format --check pkgproxy tests twisted
$PY -m mypy pkgproxy twisted

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
