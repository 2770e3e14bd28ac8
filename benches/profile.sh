#!/usr/bin/env bash
# Profiles the daemon's cache-hit path under load (loopback only, bounded):
#   1. strace -c -f: syscalls per request at depth 1 and at depth 16 (are
#      pipelined replies batched into one write?), and on the cache-off miss path;
#   2. valgrind --tool=callgrind on the daemon serving hits: instructions and
#      malloc calls per request, top functions.
# Needs strace and valgrind. Takes about 1-2 minutes.
#   benches/profile.sh            # report in target/bench-profile/
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/bench-profile}
T=$OUT/tmp
LOAD=./target/release/httpmapd-load
DAEMON=./target/release/httpmapd
KEYS=10000
N=${N:-20000}
rm -rf "$OUT"
mkdir -p "$T/ngx_tmp"

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
start() {
    local name=$1
    shift
    "$@" >"$T/$name.log" 2>&1 &
    PID=$!
    PIDS+=("$PID")
}
wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing on port $1" >&2
    return 1
}
conf() { # FILE TTL BACKEND_PORT
    cat >"$1" <<EOF
[daemon]
workers = 1
socketmap_listen = "127.0.0.1:19120"
log_level = "warn"
[cache]
max_entries = 100000
ttl = "$2"
negative_ttl = "$2"
[maps.virtual]
tcp_listen = "127.0.0.1:19121"
servers = ["http://127.0.0.1:$3/virtual"]
EOF
}

cargo build --release --bins -q
"$LOAD" --write-map "$T/map" --keyspace $KEYS 2>/dev/null
start backend "$DAEMON" backend --listen 127.0.0.1:19180 --map "$T/map"
wait_port 19180
conf "$T/hit.toml" 1h 19180

# strace_run LABEL PID LOADARGS... : syscall counts over one -n run
strace_run() {
    local label=$1 pid=$2
    shift 2
    strace -c -f -p "$pid" -o "$T/strace-$label.txt" 2>/dev/null &
    local s=$!
    sleep 0.5
    timeout 120 "$LOAD" -q "$@" -n "$N" >"$T/load-$label.txt"
    kill -INT "$s"
    wait "$s" 2>/dev/null || true
    python3 - "$label" "$T/strace-$label.txt" "$N" <<'EOF' | tee -a "$OUT/report.md"
import sys
label, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = {}
for line in open(path):
    f = line.split()
    if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
        calls[f[-1]] = int(f[3])
print(f"- {label}: " + ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v / n >= 0.01) + " per request")
EOF
}

echo "### Syscalls per request (strace -c -f, $N requests, workers = 1)" | tee "$OUT/report.md"
echo | tee -a "$OUT/report.md"
start httpmapd "$DAEMON" -c "$T/hit.toml"
D=$PID
wait_port 19121
timeout 60 "$LOAD" -q tcp:127.0.0.1:19121 -c 10 -n $KEYS --sequential --keyspace $KEYS >/dev/null
strace_run "hit tcp c=10 depth=1" "$D" tcp:127.0.0.1:19121 -c 10 --keyspace $KEYS
strace_run "hit tcp c=10 depth=16" "$D" tcp:127.0.0.1:19121 -c 10 --depth 16 --keyspace $KEYS
strace_run "hit socketmap c=10 depth=1" "$D" socketmap:inet:127.0.0.1:19120:virtual -c 10 --keyspace $KEYS
kill "$D"
wait "$D" 2>/dev/null || true

conf "$T/miss.toml" 0s 19180
start httpmapd-miss "$DAEMON" -c "$T/miss.toml"
D=$PID
wait_port 19121
strace_run "miss (cache off) tcp c=1" "$D" tcp:127.0.0.1:19121 -c 1 --keyspace $KEYS
kill "$D"
wait "$D" 2>/dev/null || true

# cg LABEL CONF LOADTARGET WARM(yes|no): the daemon under callgrind, counters
# zeroed after the warm-up, dumped right after N measured requests.
cg() {
    local label=$1 conf=$2 target=$3 warm=$4 dir="$T/cg-$(echo "$1" | tr -c 'a-z0-9\n' '_')"
    mkdir -p "$dir"
    start "httpmapd-cg" valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" "$DAEMON" -c "$conf"
    local D=$PID
    wait_port 19121
    sleep 1
    if [ "$warm" = yes ]; then
        timeout 120 "$LOAD" -q tcp:127.0.0.1:19121 -c 10 -n $KEYS --sequential --keyspace $KEYS --timeout 30s >/dev/null
    fi
    callgrind_control -z "$D" >/dev/null 2>&1 || true
    timeout 120 "$LOAD" -q "$target" -c 10 -n "$N" --keyspace $KEYS --timeout 30s >"$dir/load.txt"
    callgrind_control -d "$D" >/dev/null 2>&1 || true
    kill "$D"
    wait "$D" 2>/dev/null || true
    sleep 0.5
    # The dump taken right after the measured run (callgrind.out.1) holds exactly it.
    local f="$dir/callgrind.out.1"
    [ -f "$f" ] || f="$dir/callgrind.out"
    callgrind_annotate --inclusive=yes "$f" >"$dir/annotate-inclusive.txt" 2>/dev/null || true
    callgrind_annotate "$f" >"$dir/annotate-self.txt" 2>/dev/null || true
    echo | tee -a "$OUT/report.md"
    echo "### callgrind: $label ($N requests, c=10, depth 1)" | tee -a "$OUT/report.md"
    python3 - "$f" "$N" "$dir/annotate-inclusive.txt" <<'EOF2' | tee -a "$OUT/report.md"
import re, sys
f, n, inc = sys.argv[1], int(sys.argv[2]), sys.argv[3]
txt = open(inc).read()
m = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", txt) or re.search(r"([\d,]+)\s+PROGRAM TOTALS", txt)
if m:
    total = int(m.group(1).replace(",", ""))
    print(f"- user-space instructions per request: {total / n:.0f}")
names, counts, cur = {}, {}, None
for line in open(f, errors="replace"):
    mm = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line)
    if mm:
        if mm.group(2):
            names[mm.group(1)] = mm.group(2).strip()
        cur = names.get(mm.group(1)) if line.startswith("cfn=") else None
        continue
    if cur and line.startswith("calls="):
        counts[cur] = counts.get(cur, 0) + int(line[6:].split()[0])
for fn in ("malloc", "realloc", "free"):
    c = sum(v for k, v in counts.items() if k == fn)
    print(f"- {fn} calls per request: {c / n:.3f}")
print("- top inclusive (instructions per request):")
seen = 0
for l in txt.splitlines():
    mm = re.match(r"\s*([\d,]+) \(\s*([\d.]+)%\)\s+(\S+)", l)
    if not mm or "PROGRAM TOTALS" in l:
        continue
    name = mm.group(3)
    if not re.search(r"httpmapd::|hashbrown|lru|foldhash|memcpy|malloc|free|pthread_mutex|httparse", name):
        continue
    print(f"    {int(mm.group(1).replace(',', '')) / n:8.0f}  {mm.group(2):>6}%  {name.split(':', 1)[-1][:110]}")
    seen += 1
    if seen >= 22:
        break
EOF2
}

cg "cache hits, tcp_table" "$T/hit.toml" tcp:127.0.0.1:19121 yes
cg "cache hits, socketmap" "$T/hit.toml" socketmap:inet:127.0.0.1:19120:virtual yes
cg "misses, cache off, tcp_table -> demo backend" "$T/miss.toml" tcp:127.0.0.1:19121 no
