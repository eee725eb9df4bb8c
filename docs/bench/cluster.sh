#!/bin/sh
# The cluster's figures (docs/cluster.md, "Measured"): the shared harness against one
# pkgproxy node directly and against three nodes behind HAProxy, in one run, with
# etc/haproxy/pkgproxy.cfg as shipped (only its addresses changed, by
# tests/support/haproxy.py). Everything on 127.0.0.1.
# Usage: sh docs/bench/cluster.sh [path to the harness, default ../shared/bench]
# UP_ONLY=1 starts everything, checks one request through HAProxy and stops: no load.
set -eu
here=$(cd "$(dirname "$0")/../.." && pwd)
bench=${1:-$here/../shared/bench}
work=$(mktemp -d)
pids=""
trap 'kill $pids 2>/dev/null; rm -rf "$work"' EXIT
node() {  # node NAME PORT
    cat > "$work/$1.toml" <<TOML
node_name = "$1"
trusted_proxies = ["127.0.0.2"]

[routes.origin]
family = "generic"
immutable = true
upstream = "http://127.0.0.1:28080/"

[cache]
max_size = "20GiB"

[access_log]
enabled = false
TOML
    mkdir -p "$work/$1"
    PYTHONPATH=$here setsid python3 -c "from twisted.scripts.twistd import run; run()" \
        -n --pidfile= --logfile="$work/$1.log" pkgproxy --config "$work/$1.toml" \
        --listen "tcp:$2:interface=127.0.0.1" --cache-dir "$work/$1" &
    pids="$pids $!"
    last=$!
}
node single 8080; single=$last
node cache-a 8101; a=$last
node cache-b 8102; b=$last
node cache-c 8103; c=$last
(cd "$here" && python3 -m tests.support.haproxy 8100 8101 8102 8103) > "$work/haproxy.cfg"
setsid haproxy -db -f "$work/haproxy.cfg" > "$work/haproxy.log" 2>&1 &
haproxy=$!
pids="$pids $haproxy"
for port in 8080 8101 8102 8103 8100; do
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$port/_pkgproxy/ready" >/dev/null && break
        sleep 0.2
    done
done
if [ "${UP_ONLY:-0}" = 1 ]; then
    curl -sfI http://127.0.0.1:8100/_pkgproxy/ready | grep -i '^x-cache-node:'
    exit 0
fi
ANCHORS=${ANCHORS:-none} REPEATS=${REPEATS:-3} bash "$bench/run.sh" \
    --pid "single=$single" --pid "cluster=$a,$b,$c,$haproxy" \
    single http://127.0.0.1:8080/origin/ cluster http://127.0.0.1:8100/origin/
