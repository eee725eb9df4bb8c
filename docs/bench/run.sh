#!/bin/sh
# Run the shared benchmark harness with pkgproxy next to nginx proxy_cache, nginx serving
# from disk and Twisted's static.File, on this machine, in one run.
# Usage: sh docs/bench/run.sh [path to the harness, default ../shared/bench]
# Needs root once for the harness's Debian packages (nginx, wrk, ...): run.sh --install.
set -eu
here=$(cd "$(dirname "$0")/../.." && pwd)
bench=${1:-$here/../shared/bench}
work=$(mktemp -d)
cat > "$work/bench.toml" <<TOML
[routes.origin]
family = "generic"
immutable = true
upstream = "http://127.0.0.1:28080/"

[cache]
max_size = "20GiB"

[access_log]
enabled = false
TOML
PYTHONPATH=$here setsid python3 -c "from twisted.scripts.twistd import run; run()" \
    -n --pidfile= --logfile="$work/twistd.log" pkgproxy --config "$work/bench.toml" \
    --listen tcp:8080:interface=127.0.0.1 --cache-dir "$work/cache" &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do
    curl -sf http://127.0.0.1:8080/_pkgproxy/ready >/dev/null && break
    sleep 0.2
done
ANCHORS=${ANCHORS:-"nginx-cache nginx-direct twisted-static"} REPEATS=${REPEATS:-3} \
    bash "$bench/run.sh" --pid "pkgproxy=$pid" pkgproxy http://127.0.0.1:8080/origin/
