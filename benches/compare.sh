#!/usr/bin/env bash
# Side-by-side figures for benches/README.md, from ONE run on this machine.
#
# Starts everything on 127.0.0.1 (ports 19000-19599), runs httpmapd-load
# against it, stops everything (also on error or Ctrl-C). Bounded: every
# command runs under `timeout`; the whole script takes about 4 minutes.
#
#   benches/compare.sh                 # DUR=5s per load run
#   DUR=10s CONNS="10 100" benches/compare.sh
#   ONLY=miss benches/compare.sh      # only the misses (nginx behind httpmapd)
#   ONLY=l2 benches/compare.sh        # the misses, then the shared cache (Redis)
#   ONLY=policy benches/compare.sh    # only policy delegation beside the tcp_table miss
#   BEFORE=/path/to/old/httpmapd ONLY=miss benches/compare.sh
#       # the miss path of an older build side by side with this one, in
#       # the same run (each load run alternates: direct, before, after)
#
# Output: a Markdown report on stdout and in $OUT/report.md; raw JSON lines of
# every run in $OUT/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."

DUR=${DUR:-5s}
CONNS=${CONNS:-"10 100 1000"}
OUT=${OUT:-target/bench-compare}
KEYS=${KEYS:-10000}
BIG=${BIG:-1000000}
IDLE=${IDLE:-10000}
LOAD=./target/release/httpmapd-load
DAEMON=${DAEMON:-./target/release/httpmapd}
BEFORE=${BEFORE:-}
ONLY=${ONLY:-all}
MEMCACHED=${MEMCACHED:-/usr/bin/memcached}
NGINX=${NGINX:-/usr/sbin/nginx}
REDIS=${REDIS:-/usr/bin/redis-server}
T=$OUT/tmp

rm -rf "$OUT"
mkdir -p "$T/ngx_tmp"
: >"$OUT/results.jsonl"
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt $((IDLE + 1000)) ]; then
    echo "ulimit -n is $(ulimit -n): the idle-connection test needs $((IDLE + 1000))" >&2
fi

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

# start NAME CMD... : starts CMD in the background, sets $PID
start() {
    local name=$1
    shift
    "$@" >"$T/$name.log" 2>&1 &
    PID=$!
    PIDS+=("$PID")
}
stop() {
    kill "$1" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$1" 2>/dev/null || true
}
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listening on 127.0.0.1:$1" >&2
    return 1
}
# CPU ticks (utime+stime, all threads) of a process
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
HZ=$(getconf CLK_TCK)

# run LABEL PID|- LOADARGS... : one load run; appends a JSON line with the label
# and, when PID is given, that process's CPU time per answered request.
run() {
    local label=$1 pid=$2
    shift 2
    # A `--warmup W` runs as a load run of its own first (same target and
    # options, `-d W`), so the daemon CPU read over the measured run is
    # the measured requests' alone.
    local args=() warm=() w="" prev=""
    for a in "$@"; do
        if [ "$prev" = --warmup ]; then w=$a; prev=""; continue; fi
        prev=$a
        [ "$a" = --warmup ] && continue
        args+=("$a")
    done
    if [ -n "$w" ]; then
        prev=""
        for a in "${args[@]}"; do
            if [ "$prev" = -d ]; then warm+=("$w"); else warm+=("$a"); fi
            prev=$a
        done
        timeout 120 "$LOAD" -q "${warm[@]}" >/dev/null
    fi
    local t0=0 t1=0
    [ "$pid" != - ] && t0=$(ticks "$pid")
    local j
    j=$(timeout 120 "$LOAD" -q "${args[@]}" --json | tail -n1)
    [ "$pid" != - ] && t1=$(ticks "$pid")
    python3 - "$label" "$j" "$t0" "$t1" "$HZ" "$pid" >>"$OUT/results.jsonl" <<'EOF'
import json, sys
label, j, t0, t1, hz, pid = sys.argv[1:]
r = json.loads(j)
r["label"] = label
if pid != "-" and r["requests"]:
    r["cpu_us_per_req"] = (int(t1) - int(t0)) / int(hz) * 1e6 / r["requests"]
print(json.dumps(r))
EOF
    tail -n1 "$OUT/results.jsonl" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); l = r["latency_us"]
print("  %-34s %9.0f req/s  p50 %.1f  p99 %.1f  p99.9 %.1f us  cpu/req %.2f us  errors %d" % (
    r["label"], r["throughput_rps"], l["p50"], l["p99"], l["p999"],
    r.get("cpu_us_per_req", 0), sum(r["errors"].values())))' >&2
}

echo "building (release)..." >&2
cargo build --release --bins -q

"$LOAD" --write-map "$T/map" --keyspace "$KEYS" 2>/dev/null

daemon_conf() { # FILE WORKERS MAX_ENTRIES TTL BACKEND_PORT [PORT_OFFSET [CACHE_LINE]]
    local o=${6:-0}
    cat >"$1" <<EOF
[daemon]
workers = $2
socketmap_listen = "127.0.0.1:$((19020 + o))"
stats_listen = "127.0.0.1:$((19090 + o))"
log_level = "warn"
[cache]
max_entries = $3
ttl = "$4"
negative_ttl = "$4"
${7:-}
[maps.virtual]
tcp_listen = "127.0.0.1:$((19021 + o))"
servers = ["http://127.0.0.1:$5/virtual"]
max_connections = 64
EOF
}

# HTTPS: a private CA and a certificate for 127.0.0.1; nginx answers the
# same dict_http on 19443 with TLS (sessions cached and ticketed).
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$T/ca.key" -out "$T/ca.pem" -days 2 -subj "/CN=bench CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout "$T/srv.key" -out "$T/srv.csr" -subj "/CN=127.0.0.1" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$T/srv.ext"
openssl x509 -req -in "$T/srv.csr" -CA "$T/ca.pem" -CAkey "$T/ca.key" -CAcreateserial -out "$T/srv.pem" -days 2 -extfile "$T/srv.ext" 2>/dev/null

cat >"$T/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $PWD/$T/nginx.pid;
error_log $PWD/$T/nginx.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path $PWD/$T/ngx_tmp;
    proxy_temp_path $PWD/$T/ngx_tmp;
    fastcgi_temp_path $PWD/$T/ngx_tmp;
    uwsgi_temp_path $PWD/$T/ngx_tmp;
    scgi_temp_path $PWD/$T/ngx_tmp;
    server {
        listen 127.0.0.1:19081;
        # dict_http: every key is found, its value derived from the key.
        location / {
            add_header POSTFIX-DICT-RESULTS "fwd-\$http_postfix_dict_email";
            return 200 "";
        }
        # A policy service: every POSTed request (its body read and
        # discarded) is answered DUNNO.
        location = /policy {
            return 200 "DUNNO";
        }
    }
    server {
        listen 127.0.0.1:19443 ssl;
        ssl_certificate $PWD/$T/srv.pem;
        ssl_certificate_key $PWD/$T/srv.key;
        ssl_session_cache shared:SSL:1m;
        ssl_session_tickets on;
        location / {
            add_header POSTFIX-DICT-RESULTS "fwd-\$http_postfix_dict_email";
            return 200 "";
        }
    }
}
EOF

start backend "$DAEMON" backend --listen 127.0.0.1:19080 --map "$T/map"
wait_port 19080
if [ "$ONLY" = all ]; then
echo "== cache hits: httpmapd vs memcached, $KEYS keys, depth 1, $DUR per run ==" >&2
for w in 1 2; do
    daemon_conf "$T/hit$w.toml" "$w" 100000 1h 19080
    start httpmapd-hit$w "$DAEMON" -c "$T/hit$w.toml"
    D=$PID
    wait_port 19021
    # Fill the cache: every key once.
    timeout 60 "$LOAD" -q tcp:127.0.0.1:19021 -c 10 -n "$KEYS" --sequential --keyspace "$KEYS" >/dev/null
    for c in $CONNS; do
        run "httpmapd w=$w tcp c=$c" "$D" tcp:127.0.0.1:19021 -c "$c" -d "$DUR" --keyspace "$KEYS"
    done
    run "httpmapd w=$w socketmap c=100" "$D" socketmap:inet:127.0.0.1:19020:virtual -c 100 -d "$DUR" --keyspace "$KEYS"
    run "httpmapd w=$w tcp c=100 depth=16" "$D" tcp:127.0.0.1:19021 -c 100 --depth 16 -d "$DUR" --keyspace "$KEYS"
    stop "$D"
done
for t in 1 2; do
    start memcached-t$t "$MEMCACHED" -u nobody -l 127.0.0.1 -p 19211 -U 0 -t "$t" -m 1024 -c 20000
    M=$PID
    wait_port 19211
    timeout 60 "$LOAD" -q memcached:127.0.0.1:19211 --populate-only -c 8 --keyspace "$KEYS" >/dev/null
    for c in $CONNS; do
        run "memcached -t $t c=$c" "$M" memcached:127.0.0.1:19211 -c "$c" -d "$DUR" --keyspace "$KEYS"
    done
    run "memcached -t $t c=100 depth=16" "$M" memcached:127.0.0.1:19211 -c 100 --depth 16 -d "$DUR" --keyspace "$KEYS"
    stop "$M"
done
fi

start nginx "$NGINX" -p "$PWD/$T" -c "$PWD/$T/nginx.conf" -e "$PWD/$T/nginx.err"
N=$PID
wait_port 19081
if [ "$ONLY" != policy ]; then
echo "== misses: httpmapd (cache off) -> nginx vs direct keep-alive HTTP to nginx ==" >&2
daemon_conf "$T/miss.toml" 1 100000 0s 19081
start httpmapd-miss "$DAEMON" -c "$T/miss.toml"
D=$PID
wait_port 19021
# The same, with the server over HTTPS (ports 19220-19290).
daemon_conf "$T/miss-tls.toml" 1 100000 0s 19081 200
sed -i "s#http://127.0.0.1:19081/virtual\"\]#https://127.0.0.1:19443/virtual\"]\ntls_ca_file = \"$PWD/$T/ca.pem\"#" "$T/miss-tls.toml"
start httpmapd-miss-tls "$DAEMON" -c "$T/miss-tls.toml"
DT=$PID
wait_port 19221
if [ -n "$BEFORE" ]; then
    daemon_conf "$T/miss-before.toml" 1 100000 0s 19081 100
    start httpmapd-miss-before "$BEFORE" -c "$T/miss-before.toml"
    B=$PID
    wait_port 19121
fi
for c in 1 10; do
    run "direct http c=$c" "$N" http:127.0.0.1:19081/virtual -c "$c" -d "$DUR" --warmup 1s --keyspace "$KEYS"
    if [ -n "$BEFORE" ]; then
        run "before: httpmapd cache-off tcp c=$c" "$B" tcp:127.0.0.1:19121 -c "$c" -d "$DUR" --warmup 1s --keyspace "$KEYS"
    fi
    run "httpmapd cache-off tcp c=$c" "$D" tcp:127.0.0.1:19021 -c "$c" -d "$DUR" --warmup 1s --keyspace "$KEYS"
    run "httpmapd cache-off https tcp c=$c" "$DT" tcp:127.0.0.1:19221 -c "$c" -d "$DUR" --warmup 1s --keyspace "$KEYS"
done
# TLS handshakes (full and resumed) per 10,000 lookups over the runs above.
curl -s http://127.0.0.1:19290/metrics >"$T/miss-tls.metrics"
python3 - "$T/miss-tls.metrics" >>"$OUT/results.jsonl" <<'EOF'
import json, sys
full = resumed = lookups = connects = 0
for line in open(sys.argv[1]):
    if line.startswith("httpmapd_server_tls_handshakes_total"):
        v = float(line.split()[-1])
        if 'resumed="true"' in line: resumed += v
        else: full += v
    elif line.startswith("httpmapd_lookups_total"):
        lookups += float(line.split()[-1])
    elif line.startswith("httpmapd_server_connects_total"):
        connects += float(line.split()[-1])
print(json.dumps({"label": "tls handshakes", "full": full, "resumed": resumed,
    "connects": connects, "lookups": lookups,
    "per_10k": (full + resumed) * 10000 / lookups if lookups else 0}))
EOF
stop "$DT"
stop "$D"
if [ -n "$BEFORE" ]; then stop "$B"; fi
fi

if [ "$ONLY" = all ] || [ "$ONLY" = l2 ]; then
echo "== shared cache (Redis): L1 hits, L2 hits, misses through Redis to nginx ==" >&2
start redis "$REDIS" --port 19379 --bind 127.0.0.1 --save "" --appendonly no
RP=$PID
wait_port 19379
rc() { redis-cli -p 19379 "$@"; }
# commandstats LABEL LOOKUPS_BEFORE PID: Redis commands since the last reset, per lookup.
commandstats() {
    local label=$1
    curl -s http://127.0.0.1:$2/metrics | awk '/^httpmapd_lookups_total/ {s += $NF} END {print s + 0}' >"$T/lookups.$label"
    rc info commandstats >"$T/cmdstats.$label"
    python3 - "$label" "$T/cmdstats.$label" "$T/lookups.$label" "$3" >>"$OUT/results.jsonl" <<'EOF'
import json, re, sys
label, stats, lookups, before = sys.argv[1], open(sys.argv[2]).read(), float(open(sys.argv[3]).read()), float(sys.argv[4])
calls = {m.group(1): int(m.group(2)) for m in re.finditer(r"cmdstat_(\w+):calls=(\d+)", stats)}
n = lookups - before
print(json.dumps({"label": label, "lookups": n, "calls": calls,
    "per_lookup": {k: v / n for k, v in calls.items() if k not in ("config", "info")} if n else {}}))
EOF
}
lookups_now() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^httpmapd_lookups_total/ {s += $NF} END {print s + 0}'; }
# L1 hits: a large L1 in front of Redis (filled first).
daemon_conf "$T/l1.toml" 1 100000 1h 19081 300
printf '[shared_cache]\nurl = "redis://127.0.0.1:19379"\nprefix = "bench1:"\n' >>"$T/l1.toml"
start httpmapd-l1 "$DAEMON" -c "$T/l1.toml"
DL1=$PID
wait_port 19321
timeout 60 "$LOAD" -q tcp:127.0.0.1:19321 -c 10 -n "$KEYS" --sequential --keyspace "$KEYS" >/dev/null
run "shared: L1 hit c=10" "$DL1" tcp:127.0.0.1:19321 -c 10 -d "$DUR" --warmup 1s --keyspace "$KEYS"
stop "$DL1"
# L2 hits: L1 holds one entry, so nearly every lookup reads Redis (filled first).
daemon_conf "$T/l2.toml" 1 1 1h 19081 400
printf '[shared_cache]\nurl = "redis://127.0.0.1:19379"\nprefix = "bench2:"\n' >>"$T/l2.toml"
start httpmapd-l2 "$DAEMON" -c "$T/l2.toml"
DL2=$PID
wait_port 19421
timeout 60 "$LOAD" -q tcp:127.0.0.1:19421 -c 10 -n "$KEYS" --sequential --keyspace "$KEYS" >/dev/null
before=$(lookups_now 19490)
rc config resetstat >/dev/null
run "shared: L2 hit c=10" "$DL2" tcp:127.0.0.1:19421 -c 10 -d "$DUR" --warmup 1s --keyspace "$KEYS"
commandstats "redis commands per L2 hit" 19490 "$before"
# Misses through Redis: keys never seen (GET, the claim, SET), then nginx.
before=$(lookups_now 19490)
rc config resetstat >/dev/null
run "shared: miss c=10" "$DL2" tcp:127.0.0.1:19421 -c 10 -d "$DUR" --keyspace "$KEYS" --miss-ratio 1
commandstats "redis commands per miss" 19490 "$before"
stop "$DL2"
stop "$RP"
fi
if [ "$ONLY" = all ] || [ "$ONLY" = policy ]; then
echo "== policy delegation: the policy miss path vs the tcp_table miss path, same daemon, same nginx ==" >&2
# One daemon (workers = 1, cache off) with a map and a policy service, both
# asking the same nginx (ports 19520-19590): the map GETs /virtual, the
# policy POSTs its request's 31 attributes as JSON to /policy (no cache_key:
# every request reaches nginx).
daemon_conf "$T/policy.toml" 1 100000 0s 19081 500
cat >>"$T/policy.toml" <<EOF
[policies.bench]
listen = "127.0.0.1:19541"
servers = ["http://127.0.0.1:19081/policy"]
max_connections = 64
EOF
start httpmapd-policy "$DAEMON" -c "$T/policy.toml"
DP=$PID
wait_port 19521
wait_port 19541
# Warm up both paths (server connections pooled), outside the measured runs:
# a run's daemon CPU is read over the whole load-generator process.
for t in tcp:127.0.0.1:19521 policy:127.0.0.1:19541; do
    timeout 60 "$LOAD" -q "$t" -c 10 -d 1s --keyspace "$KEYS" >/dev/null
done
for c in 1 10; do
    run "policy: tcp_table miss c=$c" "$DP" tcp:127.0.0.1:19521 -c "$c" -d "$DUR" --keyspace "$KEYS"
    run "policy: policy miss c=$c" "$DP" policy:127.0.0.1:19541 -c "$c" -d "$DUR" --keyspace "$KEYS"
done
# The daemon's own count: requests, DUNNO actions, default actions.
curl -s http://127.0.0.1:19590/metrics >"$T/policy.metrics"
python3 - "$T/policy.metrics" >>"$OUT/results.jsonl" <<'EOF'
import json, sys
m = {"requests": 0, "dunno": 0, "default_actions": 0}
for line in open(sys.argv[1]):
    if not line.startswith("httpmapd_policy_"):
        continue
    v = float(line.split()[-1])
    if line.startswith("httpmapd_policy_requests_total"):
        m["requests"] += v
    elif line.startswith("httpmapd_policy_actions_total") and 'action="DUNNO"' in line:
        m["dunno"] += v
    elif line.startswith("httpmapd_policy_default_actions_total"):
        m["default_actions"] += v
m["label"] = "policy metrics"
print(json.dumps(m))
EOF
stop "$DP"
fi
if [ "$ONLY" != all ]; then stop "$N"; fi

if [ "$ONLY" = all ]; then
echo "== RSS: $BIG cached entries; $IDLE idle client connections ==" >&2
daemon_conf "$T/big.toml" 2 $((BIG + BIG / 10)) 1h 19081 0 'max_memory = "4GiB"' 
start httpmapd-big "$DAEMON" -c "$T/big.toml"
D=$PID
wait_port 19021
sleep 0.5
rss0=$(rss_kib "$D")
timeout 180 "$LOAD" -q tcp:127.0.0.1:19021 -c 64 --depth 4 -n "$BIG" --sequential --keyspace "$BIG" --timeout 20s --json >"$T/fill.json"
sleep 0.5
rss1=$(rss_kib "$D")
entries=$(curl -s http://127.0.0.1:19090/metrics | awk '/^httpmapd_cache_entries[ {]/ {s += $NF} END {print s + 0}')
# Key and value bytes per entry, as stored (2-byte map id, 4-byte generation
# + key; value).
kv=$(python3 -c "
n=$BIG
print(sum(6 + len(f'user{i}@example.com') + len(f'fwd-user{i}@example.com') for i in range(n)) / n)")
python3 - "$rss0" "$rss1" "$entries" "$kv" "$BIG" >>"$OUT/results.jsonl" <<'EOF'
import json, sys
rss0, rss1, entries, kv, big = map(float, sys.argv[1:])
n = entries if entries > 0 else big
print(json.dumps({"label": "rss 1M entries", "rss_before_kib": rss0, "rss_after_kib": rss1,
    "entries": entries, "bytes_per_entry": (rss1 - rss0) * 1024 / n, "key_value_bytes": kv,
    "overhead_per_entry": (rss1 - rss0) * 1024 / n - kv}))
EOF
stop "$D"
stop "$N"

for who in httpmapd memcached; do
    if [ $who = httpmapd ]; then
        daemon_conf "$T/idle.toml" 2 100000 1h 19080
        start httpmapd-idle "$DAEMON" -c "$T/idle.toml"
        P=$PID
        port=19021
        target=tcp:127.0.0.1:19021
    else
        start memcached-idle "$MEMCACHED" -u nobody -l 127.0.0.1 -p 19211 -U 0 -t 2 -m 1024 -c $((IDLE + 1000))
        P=$PID
        port=19211
        target=memcached:127.0.0.1:19211
    fi
    wait_port $port
    sleep 0.5
    r0=$(rss_kib "$P")
    timeout 90 "$LOAD" -q "$target" --idle -c "$IDLE" -d 8s --json >"$T/idle-$who.json" &
    L=$!
    PIDS+=("$L")
    # Wait until every connection is open (or 30 s), then read RSS.
    for _ in $(seq 300); do
        n=$(ls "/proc/$P/fd" | wc -l)
        [ "$n" -ge "$IDLE" ] && break
        sleep 0.1
    done
    sleep 1
    r1=$(rss_kib "$P")
    fds=$(ls "/proc/$P/fd" | wc -l)
    wait "$L" || true
    python3 - "$who" "$r0" "$r1" "$fds" "$IDLE" >>"$OUT/results.jsonl" <<'EOF'
import json, sys
who, r0, r1, fds, idle = sys.argv[1], *map(float, sys.argv[2:])
print(json.dumps({"label": f"rss idle {who}", "rss_before_kib": r0, "rss_after_kib": r1,
    "fds": fds, "per_conn_bytes": (r1 - r0) * 1024 / idle}))
EOF
    stop "$P"
done
fi

python3 - "$OUT/results.jsonl" "$DUR" <<'EOF' | tee "$OUT/report.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {r["label"]: r for r in rows}
dur = sys.argv[2]
def lat(r, k): return r["latency_us"][k]
print(f"### Cache hits (depth 1 unless noted, {dur} per run, 1 load-generator thread)\n")
print("| run | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | server CPU µs/req | errors |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    if "throughput_rps" not in r or r["label"].startswith(("direct", "httpmapd cache-off", "before: ", "shared: ", "policy: ")):
        continue
    print(f"| {r['label']} | {r['throughput_rps']:.0f} | {lat(r,'p50'):.1f} | {lat(r,'p90'):.1f} | {lat(r,'p99'):.1f} | {lat(r,'p999'):.1f} | {lat(r,'max'):.0f} | {r.get('cpu_us_per_req', 0):.2f} | {sum(r['errors'].values())} |")
print("\n### Side by side: httpmapd / memcached at the same thread count\n")
print("| threads | conns | httpmapd req/s | memcached req/s | ratio | httpmapd p99 | memcached p99 |")
print("|---|---:|---:|---:|---:|---:|---:|")
for t in (1, 2):
    for c in (10, 100, 1000):
        a, b = by.get(f"httpmapd w={t} tcp c={c}"), by.get(f"memcached -t {t} c={c}")
        if a and b:
            print(f"| {t} | {c} | {a['throughput_rps']:.0f} | {b['throughput_rps']:.0f} | {a['throughput_rps']/b['throughput_rps']:.2f} | {lat(a,'p99'):.1f} | {lat(b,'p99'):.1f} |")
if by.get("direct http c=1"):
  print("\n### Misses: httpmapd with the cache off → nginx, vs the same lookups straight to nginx\n")
  print("| conns | direct p50 µs | via httpmapd p50 µs | added p50 µs | direct p99 | via p99 | direct req/s | via req/s |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  for c in (1, 10):
    a, b = by.get(f"direct http c={c}"), by.get(f"httpmapd cache-off tcp c={c}")
    if a and b:
        print(f"| {c} | {lat(a,'p50'):.1f} | {lat(b,'p50'):.1f} | {lat(b,'p50')-lat(a,'p50'):.1f} | {lat(a,'p99'):.1f} | {lat(b,'p99'):.1f} | {a['throughput_rps']:.0f} | {b['throughput_rps']:.0f} |")
if by.get("httpmapd cache-off https tcp c=1"):
    print("\n### Misses over HTTPS vs plain HTTP (same nginx, same run)\n")
    print("| conns | plain req/s | https req/s | https/plain req/s | plain p50 µs | https p50 µs | https/plain p50 | plain p99 | https p99 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in (1, 10):
        a, b = by.get(f"httpmapd cache-off tcp c={c}"), by.get(f"httpmapd cache-off https tcp c={c}")
        if a and b:
            print(f"| {c} | {a['throughput_rps']:.0f} | {b['throughput_rps']:.0f} | {b['throughput_rps']/a['throughput_rps']:.3f} | {lat(a,'p50'):.1f} | {lat(b,'p50'):.1f} | {lat(b,'p50')/lat(a,'p50'):.3f} | {lat(a,'p99'):.1f} | {lat(b,'p99'):.1f} |")
    h = by.get("tls handshakes")
    if h:
        print(f"\nTLS handshakes over those runs: {h['full']:.0f} full + {h['resumed']:.0f} resumed for {h['lookups']:.0f} lookups ({h['connects']:.0f} connections opened): {h['per_10k']:.2f} per 10,000 lookups.")
if by.get("shared: L2 hit c=10"):
    print("\n### The shared cache (Redis on the same machine), 10 connections, workers = 1\n")
    print("| run | req/s | p50 µs | p99 µs | server CPU µs/req |")
    print("|---|---:|---:|---:|---:|")
    for label in ("shared: L1 hit c=10", "shared: L2 hit c=10", "shared: miss c=10", "httpmapd cache-off tcp c=10"):
        r = by.get(label)
        if r:
            print(f"| {label} | {r['throughput_rps']:.0f} | {lat(r,'p50'):.1f} | {lat(r,'p99'):.1f} | {r.get('cpu_us_per_req', 0):.2f} |")
    a, b = by.get("shared: L2 hit c=10"), by.get("httpmapd cache-off tcp c=10")
    if a and b:
        print(f"\nL2 hit / server miss: throughput {a['throughput_rps']/b['throughput_rps']:.2f}x, p50 {lat(a,'p50')/lat(b,'p50'):.2f}x.")
    for label in ("redis commands per L2 hit", "redis commands per miss"):
        r = by.get(label)
        if r:
            per = ", ".join(f"{k.upper()} {v:.3f}" for k, v in sorted(r["per_lookup"].items()))
            print(f"- {label}: {per} ({r['lookups']:.0f} lookups)")
if by.get("policy: policy miss c=1"):
    print("\n### Policy delegation vs tcp_table: both misses through one httpmapd (workers = 1, cache off) to the same nginx\n")
    print("| run | req/s | p50 µs | p99 µs | p99.9 µs | daemon CPU µs/req | found / not found | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in (1, 10):
        for kind in ("tcp_table", "policy"):
            r = by.get(f"policy: {kind} miss c={c}")
            if r:
                print(f"| {kind} c={c} | {r['throughput_rps']:.0f} | {lat(r,'p50'):.1f} | {lat(r,'p99'):.1f} | {lat(r,'p999'):.1f} | {r.get('cpu_us_per_req', 0):.2f} | {r['found']} / {r['not_found']} | {sum(r['errors'].values())} |")
    print()
    for c in (1, 10):
        a, b = by.get(f"policy: tcp_table miss c={c}"), by.get(f"policy: policy miss c={c}")
        if a and b:
            ca, cb = a.get("cpu_us_per_req", 0), b.get("cpu_us_per_req", 0)
            print(f"- c={c}: policy / tcp_table req/s {b['throughput_rps']/a['throughput_rps']:.3f}, "
                  f"p50 {lat(b,'p50')/lat(a,'p50'):.3f}x ({lat(b,'p50')-lat(a,'p50'):+.1f} µs), "
                  f"daemon CPU per request {cb/ca if ca else 0:.3f}x ({cb-ca:+.2f} µs)")
    m = by.get("policy metrics")
    if m:
        print(f"- the daemon's /metrics over the policy runs and their warm-up: {m['requests']:.0f} policy requests, "
              f"{m['dunno']:.0f} answered DUNNO, {m['default_actions']:.0f} default actions")
if any(r["label"].startswith("before: ") for r in rows):
    print("\n### Misses, the build in BEFORE vs this one (same run, alternating)\n")
    print("| conns | before p50 µs | after p50 µs | before p99 | after p99 | before req/s | after req/s | after/before req/s | before CPU µs/req | after CPU µs/req |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in (1, 10):
        a, b = by.get(f"before: httpmapd cache-off tcp c={c}"), by.get(f"httpmapd cache-off tcp c={c}")
        if a and b:
            print(f"| {c} | {lat(a,'p50'):.1f} | {lat(b,'p50'):.1f} | {lat(a,'p99'):.1f} | {lat(b,'p99'):.1f} | {a['throughput_rps']:.0f} | {b['throughput_rps']:.0f} | {b['throughput_rps']/a['throughput_rps']:.3f} | {a.get('cpu_us_per_req', 0):.2f} | {b.get('cpu_us_per_req', 0):.2f} |")
if any(r["label"].startswith("rss ") for r in rows):
    print("\n### Memory\n")
r = by.get("rss 1M entries")
if r:
    print(f"- {r['entries']:.0f} cached entries: RSS {r['rss_before_kib']/1024:.1f} → {r['rss_after_kib']/1024:.1f} MiB, "
          f"{r['bytes_per_entry']:.0f} B/entry of which key+value {r['key_value_bytes']:.0f} B: overhead {r['overhead_per_entry']:.0f} B/entry")
for who in ("httpmapd", "memcached"):
    r = by.get(f"rss idle {who}")
    if r:
        print(f"- {who}, {r['fds']:.0f} fds open with idle clients: RSS {r['rss_before_kib']/1024:.1f} → {r['rss_after_kib']/1024:.1f} MiB ({r['per_conn_bytes']:.0f} B/connection)")
EOF
