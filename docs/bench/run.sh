#!/bin/sh
# Run the shared benchmark harness with pkgproxy next to nginx proxy_cache, nginx serving
# from disk and Twisted's static.File, on this machine, in one run.
# Usage: sh docs/bench/run.sh [path to the harness, default ../shared/bench]
# Needs root once for the harness's Debian packages (nginx, wrk, ...): run.sh --install.
# FLOOR=1 also runs docs/bench/floor.py twice (a bare Twisted relay, and one that stores
# every body durably) on ports 8091 and 8092: the floor of any Twisted cache on misses.
# pkgproxy runs in its default configuration (access log on, to twistd's log file), as
# users run it; ACCESS_LOG=off switches the access log off (the figures before 2026-12).
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
TOML
if [ "${ACCESS_LOG:-on}" = off ]; then
    printf '\n[access_log]\nenabled = false\n' >> "$work/bench.toml"
fi
PYTHONPATH=$here setsid python3 -c "from twisted.scripts.twistd import run; run()" \
    -n --pidfile= --logfile="$work/twistd.log" pkgproxy --config "$work/bench.toml" \
    --listen tcp:8080:interface=127.0.0.1 --cache-dir "$work/cache" &
pid=$!
pids=$pid
set -- --pid "pkgproxy=$pid" pkgproxy http://127.0.0.1:8080/origin/
if [ "${FLOOR:-0}" = 1 ]; then
    setsid python3 "$here/docs/bench/floor.py" 8091 &
    relay=$!
    setsid python3 "$here/docs/bench/floor.py" 8092 --store "$work/floor" &
    store=$!
    pids="$pids $relay $store"
    set -- --pid "floor-relay=$relay" --pid "floor-store=$store" "$@" \
        floor-relay http://127.0.0.1:8091/origin/ floor-store http://127.0.0.1:8092/origin/
fi
trap 'kill $pids 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do
    curl -sf http://127.0.0.1:8080/_pkgproxy/ready >/dev/null && break
    sleep 0.2
done
ANCHORS=${ANCHORS:-"nginx-cache nginx-direct twisted-static"} REPEATS=${REPEATS:-3} \
    bash "$bench/run.sh" "$@"
