#!/usr/bin/env bash
# The statistics of a fleet in one query: three lcfs daemons ("hosts", each
# its own device, mount and TCP statistics address with a bearer token) and a
# real Prometheus server (Debian's) scraping them with the configuration and
# recording rules of packaging/prometheus/. Each host starts containers from
# image layers "web" and "db" (clones of a layer, read through their own
# directories): web 5 + 3 + 1 = 9 times, db 2 + 1 + 4 = 7 times. Checks:
# - promtool accepts the rules and the Grafana dashboard is valid JSON;
# - Prometheus sees all three targets up;
# - `topk(1, sum by (layer) (lcfs_layer_clones_total))` answers web with 9,
#   and the recording rule lcfs:layer_clones:sum answers the same;
# - host 3 alone ranks db first;
# - a scrape without the token is refused (401), so the target needs it;
# - `lcfs top layers --hosts` (no Prometheus) adds up the same three hosts,
#   names a host that does not answer, and fails with 401 on a wrong token.
# Needs root, /dev/fuse and prometheus (scripts/setup.sh installs it).
E2E_NAME=prometheus
# shellcheck source=scripts/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

e2e_init
require_commands prometheus promtool curl jq
lcfs_build
packaging="$E2E_REPO/packaging/prometheus"

quietly promtool check rules "$packaging/lcfs-rules.yml" || die "promtool refuses packaging/prometheus/lcfs-rules.yml"
python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$packaging/grafana-lcfs.json" ||
    die "packaging/prometheus/grafana-lcfs.json is not JSON"

# free_ports N: N TCP ports nothing listens on now.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

token="$E2E_WORK/stats.token"
(umask 077 && python3 -c 'import secrets; print(secrets.token_hex(24))' >"$token")
read -r -a ports <<<"$(free_ports 4)"
prometheus_port=${ports[3]}

# Three daemons; lcfs_start runs one at a time, so each host's pid moves to
# HOST_PIDS and the trap's hook stops them all (the mounts are the trap's).
HOST_PIDS=()
hosts_stop() {
    local pid
    for pid in "${HOST_PIDS[@]}"; do
        stop_pid "$pid"
    done
}
E2E_CLEANUP_HOOKS+=(hosts_stop)

# starts HOST CLONES_OF_WEB CLONES_OF_DB
host() {
    local n=$1 web=$2 db=$3 image i
    LCFS_DEVICE="$E2E_SCRATCH/host$n.device"
    install -d -m 0700 "$E2E_WORK/host$n" "$E2E_WORK/host$n/lcfs"
    LCFS_MOUNT="$E2E_WORK/host$n/lcfs/mnt"
    LCFS_SOCKET="$E2E_WORK/host$n/control.sock"
    LCFS_LOG="$E2E_WORK/host$n/daemon.log"
    mkdir -p "$LCFS_MOUNT"
    quietly "$LCFS_BIN" mkfs "$LCFS_DEVICE" --size 1G || die "lcfs mkfs for host $n failed"
    LCFS_DAEMON_ARGS="--stats-listen 127.0.0.1:${ports[$((n - 1))]} --stats-token-file $token" lcfs_start
    HOST_PIDS+=("$LCFS_PID")
    LCFS_PID=""
    for image in web db; do
        # Pulled-like (cold) layers: images, as Docker's and containerd's are.
        quietly lcfs_ctl layer create --cold "$image" || die "host $n: layer create $image failed"
        head -c 65536 /dev/urandom >"$LCFS_MOUNT/$image/app"
    done
    for image in web db; do
        local count=$web
        [[ $image == web ]] || count=$db
        for ((i = 0; i < count; i++)); do
            quietly lcfs_ctl layer clone "$image" "$image-c$i" || die "host $n: clone of $image failed"
            cat "$LCFS_MOUNT/$image-c$i/app" >/dev/null
        done
    done
    say "host $n: statistics on 127.0.0.1:${ports[$((n - 1))]}, web started $web times, db $db"
}
host 1 5 2
host 2 3 1
host 3 1 4

# The daemon refuses a scrape without the token.
status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${ports[0]}/metrics")
[[ $status == 401 ]] || die "a scrape without the token got HTTP $status, expected 401"

# Prometheus with packaging/'s rules and a scrape configuration like
# packaging/prometheus/prometheus-lcfs.yml, every second.
prom="$E2E_WORK/prometheus"
mkdir -p "$prom/data"
cp "$packaging/lcfs-rules.yml" "$prom/"
cat >"$prom/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - lcfs-rules.yml
scrape_configs:
  - job_name: lcfs
    authorization:
      type: Bearer
      credentials_file: $token
    static_configs:
      - targets: ["127.0.0.1:${ports[0]}", "127.0.0.1:${ports[1]}", "127.0.0.1:${ports[2]}"]
EOF
quietly promtool check config "$prom/prometheus.yml" || die "promtool refuses the scrape configuration"
prometheus --config.file="$prom/prometheus.yml" --storage.tsdb.path="$prom/data" \
    --web.listen-address="127.0.0.1:$prometheus_port" >"$prom/log" 2>&1 &
PROMETHEUS_PID=$!
prometheus_stop() { stop_pid "$PROMETHEUS_PID"; }
E2E_CLEANUP_HOOKS+=(prometheus_stop)

# query PROMQL: the result vector as JSON.
query() {
    curl -sf "http://127.0.0.1:$prometheus_port/api/v1/query" --data-urlencode "query=$1" | jq -c '.data.result'
}

# until_answer PROMQL JQ_TEST: polls (30 s at most) until the result passes.
until_answer() {
    local result=""
    for _ in $(seq 60); do
        result=$(query "$1" 2>/dev/null || true)
        if [[ -n $result ]] && jq -e "$2" <<<"$result" >/dev/null 2>&1; then
            echo "$result"
            return 0
        fi
        sleep 0.5
    done
    tail -n 20 "$prom/log" >&2
    die "Prometheus never answered $1 as $2 (last: ${result:-nothing})"
}

until_answer 'count(up{job="lcfs"} == 1)' '.[0].value[1] == "3"' >/dev/null
say "Prometheus scrapes all three hosts"
top=$(until_answer 'topk(1, sum by (layer) (lcfs_layer_clones_total))' \
    '.[0].metric.layer == "web" and .[0].value[1] == "9"')
say "fleet-wide top layer: $(jq -r '.[0].metric.layer + " started " + .[0].value[1] + " times"' <<<"$top")"
until_answer 'topk(1, lcfs:layer_clones:sum)' '.[0].metric.layer == "web" and .[0].value[1] == "9"' >/dev/null
until_answer 'sum by (layer) (lcfs_layer_clones_total{layer="db"})' '.[0].value[1] == "7"' >/dev/null
until_answer "topk(1, lcfs_layer_clones_total{instance=\"127.0.0.1:${ports[2]}\"})" \
    '.[0].metric.layer == "db" and .[0].value[1] == "4"' >/dev/null
say "recording rule and per-host answers agree"
# Reads through each container's directory reach the metrics: web's nine
# containers read 64 KiB each.
until_answer 'sum(lcfs_layer_read_bytes_total{layer=~"web-c.*"})' '.[0].value[1] == "589824"' >/dev/null
# The top image across the hosts, one query (and its recording rule).
top=$(until_answer 'topk(1, sum by (image) (lcfs_image_starts_total))' \
    '.[0].metric.image == "web" and .[0].value[1] == "9"')
say "fleet-wide top image: $(jq -r '.[0].metric.image + " started " + .[0].value[1] + " times"' <<<"$top")"
until_answer 'topk(1, lcfs:image_starts:sum)' '.[0].metric.image == "web" and .[0].value[1] == "9"' >/dev/null
until_answer 'sum(lcfs:image_read_bytes:sum{image="web"})' '.[0].value[1] == "589824"' >/dev/null

# Every query of the Grafana dashboard is valid PromQL ($top as 10).
while IFS= read -r expr; do
    curl -sf "http://127.0.0.1:$prometheus_port/api/v1/query" --data-urlencode "query=${expr//\$top/10}" >/dev/null ||
        die "Prometheus refuses the dashboard's query $expr"
done < <(jq -r '.panels[].targets[].expr' "$packaging/grafana-lcfs.json")
say "the dashboard's $(jq '[.panels[].targets[]] | length' "$packaging/grafana-lcfs.json") queries are valid"

# Without Prometheus: lcfs top layers --hosts asks each host's API and adds
# up; a host that does not answer is named on stderr, the others still count.
hosts="127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}"
fleet=$("$LCFS_BIN" top layers --hosts "$hosts,127.0.0.1:$prometheus_port" --token-file "$token" \
    --json --limit 2 2>"$E2E_WORK/fleet.err") || die "lcfs top layers --hosts failed: $(cat "$E2E_WORK/fleet.err")"
jq -e '.[0].name == "web" and .[0].hosts == 3 and .[0].usage.clones == 9 and
    .[1].name == "db" and .[1].usage.clones == 7' <<<"$fleet" >/dev/null ||
    die "lcfs top layers --hosts answered $fleet"
grep -q "127.0.0.1:$prometheus_port" "$E2E_WORK/fleet.err" ||
    die "the host that is not lcfs was not reported: $(cat "$E2E_WORK/fleet.err")"
"$LCFS_BIN" top layers --hosts "$hosts" --token-file "$token" | sed 's/^/    /'
wrong="$E2E_WORK/wrong.token"
(umask 077 && echo "not-the-token-of-these-hosts" >"$wrong")
if "$LCFS_BIN" top layers --hosts "$hosts" --token-file "$wrong" >/dev/null 2>"$E2E_WORK/fleet.err"; then
    die "lcfs top layers --hosts succeeded with a wrong token"
fi
grep -q "401" "$E2E_WORK/fleet.err" || die "a wrong token was not reported as 401: $(cat "$E2E_WORK/fleet.err")"
fleet=$("$LCFS_BIN" top images --hosts "$hosts" --token-file "$token" --json --limit 1) ||
    die "lcfs top images --hosts failed"
jq -e '.[0].name == "web" and .[0].starts == 9 and .[0].containers == 9' <<<"$fleet" >/dev/null ||
    die "lcfs top images --hosts answered $fleet"
files=$("$LCFS_BIN" top files --hosts "$hosts" --token-file "$token" --image db --json) ||
    die "lcfs top files --hosts failed"
jq -e '.[0].path == "/app" and .[0].bytes == 7 * 65536' <<<"$files" >/dev/null ||
    die "lcfs top files --hosts answered $files"
"$LCFS_BIN" top images --hosts "$hosts" --token-file "$token" | sed 's/^/    /'
say "lcfs top layers|images|files --hosts add up the three hosts"
say "PASS: one query answers the top layer and the top image across three hosts"
