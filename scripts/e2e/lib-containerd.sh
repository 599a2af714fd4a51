# shellcheck shell=bash
# Private containerd 1.7, dockerd 26.1 (on the containerd image store) and
# registry 2.8 for the containerd checks. Source it after lib.sh; call its
# start functions after e2e_init. Needs scripts/setup.sh to have unpacked
# the Debian 13 packages (setup.sh --deb-dir says where).
#
# Everything is private to the run: containerd's root on the scratch ext4
# (the overlayfs snapshotter needs a real file system under it), its state,
# sockets and config in the work directory; the registry stores on the
# scratch ext4 and listens on a free port of 127.0.0.1. Each daemon is
# stopped by the pid we started; the cleanup also removes the containers and
# tasks left in our containerd, so no shim or container outlives the run.
#
# The lcfs snapshotter is registered as containerd proxy plugin
# "$CONTAINERD_SNAPSHOTTER" at $LCFS_CONTAINERD_SOCKET, by default a socket
# in the work directory (E2E_SNAPSHOTTER_SOCKET changes it). The lcfs
# differ on the same socket is proxy plugin "lcfs-diff", tried before
# containerd's walking differ (CONTAINERD_LCFS_DIFF=0 leaves it out); the
# lcfs daemon reads blobs from this containerd ($LCFS_CONTAINERD_ADDRESS,
# set by containerd_tools, passed by lcfs_start).
#
# Functions:
#   containerd_tools           finds the unpacked binaries (sets CTR_BIN and others)
#   containerd_start           starts containerd; talk to it with `ctrd ARGS...`
#   containerd_stop            removes our tasks and containers, stops containerd
#   lcfs_snapshotter_wait      waits for the lcfs daemon's snapshotter socket
#   registry_start             starts the registry at $REGISTRY (host:port)
#   secure_registry_start      the same storage over HTTPS with a password,
#                              at $SECURE_REGISTRY
#   registry_push ARCHIVE REF  pushes a `docker save` archive as $REGISTRY/REF
#   throttle_start RATE_MIB COUNT_FILE [PORT]
#                              the registry behind bench/mirror/throttle.py at
#                              127.0.0.1:$THROTTLE_PORT; throttle_stop stops it
#   docker26_start NAME SNAPSHOTTER
#                              a dockerd 26 on our containerd, image store in
#                              SNAPSHOTTER; talk to it with `docker26 NAME ARGS...`

CONTAINERD_SNAPSHOTTER=${CONTAINERD_SNAPSHOTTER:-lcfs}
CONTAINERD_LCFS_DIFF=${CONTAINERD_LCFS_DIFF:-1}
CONTAINERD_PID=""
CONTAINERD_DIR=""
CONTAINERD_ADDRESS=""
# The namespace `ctrd` uses; dockerds get their own (docker-NAME).
CTRD_NAMESPACE=${CTRD_NAMESPACE:-e2e}
REGISTRY_PID=""
REGISTRY=""

# deb_dir PACKAGE: where setup.sh unpacked the pinned Debian 13 PACKAGE.
deb_dir() {
    bash "$E2E_REPO/scripts/setup.sh" --deb-dir "$1" ||
        die "Debian 13 package $1 is not unpacked; run scripts/setup.sh"
}

# containerd_tools [docker] [registry]: sets CONTAINERD_BIN, CTR_BIN and
# CTRD_PATH (containerd's shims first, then dockerd 26's helpers, then the
# system's runc); with "docker" also DOCKERD26_BIN, DOCKER26_CLI and
# DOCKER26_BUILDX (the CLI plugin `docker build` runs BuildKit through), with
# "registry" REGISTRY_BIN.
containerd_tools() {
    local containerd docker docker_cli registry want
    containerd=$(deb_dir containerd)
    CONTAINERD_BIN=$containerd/usr/bin/containerd
    CTR_BIN=$containerd/usr/bin/ctr
    # containerd finds its shim (containerd-shim-runc-v2) through PATH: the
    # system's may be another version.
    CTRD_PATH="$containerd/usr/bin:$PATH"
    # containerd_start's address, known before it starts: the lcfs daemon
    # (started first) is told where to read blobs.
    [[ -n ${E2E_WORK:-} ]] || die "internal: containerd_tools before e2e_init"
    LCFS_CONTAINERD_ADDRESS=$E2E_WORK/ctrd/c.sock
    for want in "$@"; do
        case $want in
            docker)
                docker=$(deb_dir docker.io)
                docker_cli=$(deb_dir docker-cli)
                DOCKERD26_BIN=$docker/usr/sbin/dockerd
                DOCKER26_CLI=$docker_cli/usr/bin/docker
                DOCKER26_BUILDX=$(deb_dir docker-buildx)/usr/libexec/docker/cli-plugins/docker-buildx
                [[ -x $DOCKER26_BUILDX ]] || die "no docker-buildx plugin at $DOCKER26_BUILDX"
                CTRD_PATH="$containerd/usr/bin:$docker/usr/sbin:$docker/usr/bin:$PATH"
                ;;
            registry)
                registry=$(deb_dir docker-registry)
                REGISTRY_BIN=$registry/usr/bin/docker-registry
                ;;
            *) die "internal: containerd_tools: unknown part '$want'" ;;
        esac
    done
    require_commands runc
}

# Every ctr and docker command gets this many seconds: a snapshotter that
# stops answering fails the check instead of holding CI until its limit.
E2E_COMMAND_TIMEOUT=${E2E_COMMAND_TIMEOUT:-300}

# ctrd ARGS...: ctr against our containerd, namespace $CTRD_NAMESPACE.
ctrd() {
    timeout "$E2E_COMMAND_TIMEOUT" "$CTR_BIN" --address "$CONTAINERD_ADDRESS" --namespace "$CTRD_NAMESPACE" "$@"
}

# lcfs_snapshotter_wait: waits (10 s at most) until the lcfs daemon serves
# the snapshots API on $LCFS_CONTAINERD_SOCKET; dies with "snapshotter socket
# not found" otherwise, at once when the daemon has no such service.
lcfs_snapshotter_wait() {
    local waited=0
    [[ -n $LCFS_CONTAINERD_SOCKET ]] || die "internal: lcfs_snapshotter_wait without LCFS_CONTAINERD_SOCKET"
    if ! lcfs_has_containerd; then
        die "snapshotter socket not found: $LCFS_CONTAINERD_SOCKET (this lcfs daemon has no --containerd-socket: it does not serve containerd's snapshots API)"
    fi
    # Connected to, not only present: a daemon killed with -9 leaves its
    # socket file behind until the next one binds it again.
    until [[ -S $LCFS_CONTAINERD_SOCKET ]] && python3 -c 'import socket, sys
socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$LCFS_CONTAINERD_SOCKET" 2>/dev/null; do
        if [[ -n $LCFS_PID ]] && ! kill -0 "$LCFS_PID" 2>/dev/null; then
            lcfs_log_tail
            die "snapshotter socket not found: $LCFS_CONTAINERD_SOCKET (the lcfs daemon exited)"
        fi
        waited=$((waited + 1))
        if [[ $waited -gt 100 ]]; then
            lcfs_log_tail
            die "snapshotter socket not found: $LCFS_CONTAINERD_SOCKET (waited 10 s)"
        fi
        sleep 0.1
    done
}

# containerd_start: a private containerd with the lcfs proxy snapshotter and
# the CRI plugin off (nothing here speaks CRI). Waits until it answers.
containerd_start() {
    [[ -z $CONTAINERD_PID ]] || die "internal: containerd is already running ($CONTAINERD_PID)"
    [[ -n ${CTR_BIN:-} ]] || containerd_tools
    # Short: shim and task sockets live below it (108-byte limit).
    CONTAINERD_DIR="$E2E_WORK/ctrd"
    CONTAINERD_ADDRESS="$CONTAINERD_DIR/c.sock"
    local root="$E2E_SCRATCH/containerd" socket=${LCFS_CONTAINERD_SOCKET:-$E2E_WORK/snapshotter.sock}
    mkdir -p "$CONTAINERD_DIR/state" "$CONTAINERD_DIR/opt" "$root"
    cat >"$CONTAINERD_DIR/config.toml" <<EOF
version = 2
root = "$root"
state = "$CONTAINERD_DIR/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "$CONTAINERD_ADDRESS"

[ttrpc]
  address = "$CONTAINERD_ADDRESS.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "$CONTAINERD_DIR/opt"

[proxy_plugins.$CONTAINERD_SNAPSHOTTER]
  type = "snapshot"
  address = "$socket"
EOF
    if [[ $CONTAINERD_LCFS_DIFF == 1 ]]; then
        # The lcfs differ first: it unpacks layers into lcfs snapshots inside
        # the daemon and answers Unimplemented for every other snapshotter's
        # mounts, which sends containerd on to its walking differ.
        cat >>"$CONTAINERD_DIR/config.toml" <<EOF

[proxy_plugins.lcfs-diff]
  type = "diff"
  address = "$socket"

[plugins."io.containerd.service.v1.diff-service"]
  default = ["lcfs-diff", "walking"]
EOF
    fi
    [[ " ${E2E_CLEANUP_HOOKS[*]} " == *" containerd_stop "* ]] || E2E_CLEANUP_HOOKS+=(containerd_stop)
    echo "--- containerd start $(date -Is)" >>"$CONTAINERD_DIR/containerd.log"
    PATH=$CTRD_PATH "$CONTAINERD_BIN" --config "$CONTAINERD_DIR/config.toml" \
        >>"$CONTAINERD_DIR/containerd.log" 2>&1 &
    CONTAINERD_PID=$!
    echo "$CONTAINERD_PID" >"$CONTAINERD_DIR/containerd.pid"
    local waited=0
    until "$CTR_BIN" --address "$CONTAINERD_ADDRESS" version >/dev/null 2>&1; do
        if ! kill -0 "$CONTAINERD_PID" 2>/dev/null; then
            CONTAINERD_PID=""
            containerd_log_tail
            die "containerd exited before answering"
        fi
        waited=$((waited + 1))
        if [[ $waited -gt 300 ]]; then
            containerd_log_tail
            die "containerd did not answer on $CONTAINERD_ADDRESS within 30 s"
        fi
        sleep 0.1
    done
}

containerd_log_tail() {
    local log="$CONTAINERD_DIR/containerd.log"
    [[ -f $log ]] || return 0
    echo "$E2E_NAME: last lines of containerd's log ($log):" >&2
    tail -n 30 "$log" | sed 's/^/    /' >&2
}

# containerd_remove_tasks: kills and deletes every task and container in
# every namespace of our containerd (their shims exit with them).
containerd_remove_tasks() {
    local namespace id
    for namespace in $("$CTR_BIN" --address "$CONTAINERD_ADDRESS" namespaces ls -q 2>/dev/null); do
        for id in $("$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n "$namespace" tasks ls -q 2>/dev/null); do
            timeout 20 "$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n "$namespace" tasks kill -a -s KILL "$id" >/dev/null 2>&1
            timeout 20 "$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n "$namespace" tasks delete -f "$id" >/dev/null 2>&1
        done
        for id in $("$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n "$namespace" containers ls -q 2>/dev/null); do
            timeout 20 "$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n "$namespace" containers delete "$id" >/dev/null 2>&1
        done
    done
    return 0
}

# containerd_stop: stops our containerd (SIGTERM, SIGKILL after 30 s), then
# any shim it started that is still alive (found by our containerd's address
# on its command line), and unmounts what is left below our directories.
containerd_stop() {
    [[ -n $CONTAINERD_PID ]] || return 0
    local waited=0 pid mount
    if kill -0 "$CONTAINERD_PID" 2>/dev/null; then
        containerd_remove_tasks
        kill -TERM "$CONTAINERD_PID" 2>/dev/null || true
        while kill -0 "$CONTAINERD_PID" 2>/dev/null && [[ $waited -lt 300 ]]; do
            waited=$((waited + 1))
            sleep 0.1
        done
        kill -KILL "$CONTAINERD_PID" 2>/dev/null || true
    fi
    wait "$CONTAINERD_PID" 2>/dev/null || true
    CONTAINERD_PID=""
    for pid in $(grep -lsF -- "$CONTAINERD_ADDRESS" /proc/[0-9]*/cmdline | cut -d/ -f3); do
        [[ $({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) == *containerd-shim* ]] || continue
        kill -KILL "$pid" 2>/dev/null || true
    done
    for mount in $(awk -v a="$CONTAINERD_DIR/" -v b="$E2E_SCRATCH/containerd/" \
        'index($2, a) == 1 || index($2, b) == 1 { print $2 }' /proc/self/mounts | sort -r); do
        umount -l "$mount" 2>/dev/null || true
    done
    return 0
}

# registry_start: a private registry 2.8 on a free port of 127.0.0.1,
# storage on the scratch ext4; sets REGISTRY (host:port).
registry_start() {
    [[ -z $REGISTRY_PID ]] || die "internal: the registry is already running ($REGISTRY_PID)"
    registry_launch registry "" ""
    REGISTRY_PID=$LAUNCHED_PID
    REGISTRY=$LAUNCHED_ADDRESS
}

# secure_registry_start: a second registry on the same storage, serving
# HTTPS with a certificate of a CA made for the run ($SECURE_REGISTRY_CA)
# and asking for user e2e-puller's password ($SECURE_REGISTRY_PASSWORD,
# htpasswd); sets SECURE_REGISTRY (host:port).
SECURE_REGISTRY_PID=""
secure_registry_start() {
    [[ -z $SECURE_REGISTRY_PID ]] || die "internal: the secure registry is already running"
    local dir="$E2E_WORK/registry-secure"
    mkdir -p "$dir"
    SECURE_REGISTRY_CA="$dir/ca.pem"
    SECURE_REGISTRY_PASSWORD="pw-$RANDOM$RANDOM"
    quietly openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=lcfs e2e CA" \
        -keyout "$dir/ca.key" -out "$SECURE_REGISTRY_CA" || die "openssl: the CA"
    quietly openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
        -keyout "$dir/server.key" -out "$dir/server.csr" || die "openssl: the request"
    printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$dir/ext"
    quietly openssl x509 -req -in "$dir/server.csr" -CA "$SECURE_REGISTRY_CA" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 2 -extfile "$dir/ext" -out "$dir/server.pem" || die "openssl: the certificate"
    # The registry reads bcrypt only; crypt(3) of Debian's libxcrypt makes it.
    python3 -W ignore -c 'import crypt, sys; print("e2e-puller:" + crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))' \
        "$SECURE_REGISTRY_PASSWORD" >"$dir/htpasswd" || die "could not make the htpasswd file"
    registry_launch registry-secure "auth:
  htpasswd:
    realm: lcfs-e2e
    path: $dir/htpasswd" "tls:
    certificate: $dir/server.pem
    key: $dir/server.key" --cacert "$SECURE_REGISTRY_CA" -u "e2e-puller:$SECURE_REGISTRY_PASSWORD"
    SECURE_REGISTRY_PID=$LAUNCHED_PID
    SECURE_REGISTRY=$LAUNCHED_ADDRESS
}

# throttle_start RATE_MIB COUNT_FILE [PORT]: the registry's egress through
# bench/mirror/throttle.py on 127.0.0.1:$THROTTLE_PORT (PORT, e.g. the same
# one again after throttle_stop, or a free one): at most RATE_MIB MiB/s for
# all clients together, the body bytes it sent written to COUNT_FILE. Waits
# until it answers.
THROTTLE_PID=""
THROTTLE_PORT=""
throttle_start() {
    local waited=0
    [[ -z $THROTTLE_PID ]] || die "internal: the throttle is already running ($THROTTLE_PID)"
    THROTTLE_PORT=${3:-$(free_port)}
    python3 "$E2E_REPO/bench/mirror/throttle.py" "$THROTTLE_PORT" "$REGISTRY" "$1" "$2" \
        >>"$E2E_WORK/throttle.log" 2>&1 &
    THROTTLE_PID=$!
    [[ " ${E2E_CLEANUP_HOOKS[*]} " == *" throttle_stop "* ]] || E2E_CLEANUP_HOOKS+=(throttle_stop)
    until curl -fsS "http://127.0.0.1:$THROTTLE_PORT/v2/" >/dev/null 2>&1; do
        [[ $waited -lt 100 ]] || die "the throttle did not answer: $(tail -n 3 "$E2E_WORK/throttle.log")"
        waited=$((waited + 1))
        sleep 0.1
    done
}

throttle_stop() {
    [[ -n $THROTTLE_PID ]] || return 0
    stop_pid "$THROTTLE_PID" || true
    THROTTLE_PID=""
}

# free_port: a port of 127.0.0.1 the kernel just handed out and took back.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# registry_launch NAME AUTH_YAML TLS_YAML [CURL_ARGS...]: a registry process
# (config and log in $E2E_WORK/NAME) on the shared storage, waited for
# until `curl CURL_ARGS` gets its /v2/; sets LAUNCHED_PID and
# LAUNCHED_ADDRESS.
registry_launch() {
    local name=$1 auth=$2 tls=$3 dir="$E2E_WORK/$1" port waited=0 scheme=http
    shift 3
    [[ -n ${REGISTRY_BIN:-} ]] || containerd_tools registry
    [[ -z $tls ]] || scheme=https
    mkdir -p "$dir" "$E2E_SCRATCH/registry"
    # A port the kernel just handed out and took back: free unless another
    # process grabs it in the next instant (then the registry fails to
    # start and says so).
    port=$(free_port)
    cat >"$dir/config.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $E2E_SCRATCH/registry
  delete:
    enabled: true
$auth
http:
  addr: 127.0.0.1:$port
  $tls
YAML
    [[ " ${E2E_CLEANUP_HOOKS[*]} " == *" registry_stop "* ]] || E2E_CLEANUP_HOOKS+=(registry_stop)
    "$REGISTRY_BIN" serve "$dir/config.yml" >>"$dir/registry.log" 2>&1 &
    LAUNCHED_PID=$!
    echo "$LAUNCHED_PID" >"$dir/registry.pid"
    LAUNCHED_ADDRESS="127.0.0.1:$port"
    until curl -fsS "$@" "$scheme://$LAUNCHED_ADDRESS/v2/" >/dev/null 2>&1; do
        if ! kill -0 "$LAUNCHED_PID" 2>/dev/null || [[ $waited -gt 100 ]]; then
            tail -n 20 "$dir/registry.log" | sed 's/^/    /' >&2
            die "the registry $name did not answer on $LAUNCHED_ADDRESS"
        fi
        waited=$((waited + 1))
        sleep 0.1
    done
}

# registry_stop: both registries, by pid.
registry_stop() {
    local pid
    for pid in "$REGISTRY_PID" "$SECURE_REGISTRY_PID"; do
        [[ -n $pid ]] || continue
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    REGISTRY_PID=""
    SECURE_REGISTRY_PID=""
}

# registry_push ARCHIVE REF: imports a `docker save` archive holding one
# image into our containerd (namespace e2e-push, not unpacked, layers
# gzipped as a registry serves them) and pushes it as $REGISTRY/REF.
registry_push() {
    local archive=$1 ref=$2 source
    quietly timeout "$E2E_COMMAND_TIMEOUT" "$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n e2e-push images import \
        --no-unpack --compress-blobs "$archive" || die "ctr images import $archive failed"
    # The name the archive carries, as containerd normalizes it.
    source=$(tar -xOf "$archive" manifest.json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["RepoTags"][0])')
    [[ $source == */* ]] || source="library/$source"
    [[ $source == *.*/* ]] || source="docker.io/$source"
    quietly "$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n e2e-push images tag --force "$source" "$REGISTRY/$ref" ||
        die "could not tag $source as $REGISTRY/$ref"
    quietly timeout "$E2E_COMMAND_TIMEOUT" "$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n e2e-push images push --plain-http "$REGISTRY/$ref" ||
        die "pushing $REGISTRY/$ref failed"
}

# docker26_start NAME SNAPSHOTTER: a private dockerd 26 on our containerd,
# with the containerd image store (feature containerd-snapshotter) in
# SNAPSHOTTER (its storage-driver names a containerd snapshotter, a proxy
# plugin's name included), its own containerd namespaces, data root on the
# scratch ext4, exec root, socket and pidfile. Stopped by lib.sh's
# dockerd_stop (the trap does it too).
docker26_start() {
    local name=$1 snapshotter=$2 dir pid waited=0
    [[ -n ${DOCKERD26_BIN:-} ]] || containerd_tools docker
    [[ -n $CONTAINERD_PID ]] || die "internal: docker26_start before containerd_start"
    [[ -z ${DOCKERD_PIDS[$name]:-} ]] || die "internal: dockerd $name is already running"
    dir="$E2E_WORK/d-$name"
    mkdir -p "$dir/exec" "$E2E_SCRATCH/docker-$name"
    # lib.sh's associative arrays (dockerd_stop and the trap read them).
    # shellcheck disable=SC2034,SC2004
    DOCKERD_DIRS[$name]=$dir
    cat >"$dir/daemon.json" <<EOF
{"features": {"containerd-snapshotter": true}, "storage-driver": "$snapshotter"}
EOF
    echo "--- dockerd 26 $name start $(date -Is)" >>"$dir/dockerd.log"
    PATH=$CTRD_PATH "$DOCKERD26_BIN" --config-file "$dir/daemon.json" \
        --containerd "$CONTAINERD_ADDRESS" --containerd-namespace "docker-$name" \
        --containerd-plugins-namespace "docker-$name-plugins" \
        --data-root "$E2E_SCRATCH/docker-$name" --exec-root "$dir/exec" \
        -H "unix://$dir/docker.sock" -p "$dir/docker.pid" \
        --iptables=false --ip6tables=false --bridge=none --ip-forward=false \
        --ip-masq=false --userland-proxy=false >>"$dir/dockerd.log" 2>&1 &
    pid=$!
    # shellcheck disable=SC2004
    DOCKERD_PIDS[$name]=$pid
    until docker26 "$name" version >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            unset "DOCKERD_PIDS[$name]"
            dockerd_log_tail "$name"
            die "dockerd 26 $name ($snapshotter) exited before answering"
        fi
        waited=$((waited + 1))
        if [[ $waited -gt 600 ]]; then
            dockerd_log_tail "$name"
            die "dockerd 26 $name ($snapshotter) did not answer within 60 s"
        fi
        sleep 0.1
    done
}

# docker26 NAME ARGS...: the docker 26 client against dockerd NAME, with a
# private client configuration (DOCKER_CONFIG) whose only CLI plugin is the
# pinned docker-buildx: `docker build` is a BuildKit build.
docker26() {
    local name=$1 config="$E2E_WORK/docker26-config"
    shift
    if [[ ! -L $config/cli-plugins/docker-buildx ]]; then
        mkdir -p "$config/cli-plugins"
        ln -sfn "$DOCKER26_BUILDX" "$config/cli-plugins/docker-buildx"
    fi
    DOCKER_CONFIG=$config timeout "$E2E_COMMAND_TIMEOUT" "$DOCKER26_CLI" -H "unix://$E2E_WORK/d-$name/docker.sock" "$@"
}

# mirrors_start N UPSTREAM CACHE_MIB [TOML] [UPSTREAM_FN]: N lcfs daemons,
# each on a fresh device file and serving the registry mirror
# (docs/mirror.md) with the others as peers, the registry UPSTREAM
# (host:port) as their upstream, at http://UPSTREAM unless `UPSTREAM_FN I`
# prints daemon I's [upstreams."UPSTREAM"] table; TOML is added to each
# mirror.toml. Sets MIRROR_PORTS; daemon i
# lives in $E2E_WORK/mirror<i> (mirror_ctl I ARGS asks it). Waits until
# every mirror answers.
MIRROR_PIDS=()
MIRROR_PORTS=()
mirrors_start() {
    local n=$1 upstream=$2 cache_mib=$3 extra=${4:-} upstream_fn=${5:-} i dir peers waited entry
    MIRROR_PORTS=()
    for ((i = 0; i < n; i++)); do
        MIRROR_PORTS+=("$(free_port)")
    done
    peers=$(printf '"127.0.0.1:%s", ' "${MIRROR_PORTS[@]}")
    [[ " ${E2E_CLEANUP_HOOKS[*]} " == *" mirrors_stop "* ]] || E2E_CLEANUP_HOOKS+=(mirrors_stop)
    for ((i = 0; i < n; i++)); do
        dir="$E2E_WORK/mirror$i"
        rm -rf "$dir"
        mkdir -p "$dir/run"
        entry="[upstreams]
\"$upstream\" = \"http://$upstream\""
        [[ -z $upstream_fn ]] || entry=$("$upstream_fn" "$i")
        cat >"$dir/mirror.toml" <<TOML
listen = "127.0.0.1:${MIRROR_PORTS[$i]}"
self = "127.0.0.1:${MIRROR_PORTS[$i]}"
peers = [${peers%, }]
cache_mib = $cache_mib
default_upstream = "$upstream"
$extra
$entry
TOML
        rm -f "$E2E_SCRATCH/mirror$i.img"
        quietly "$LCFS_BIN" mkfs "$E2E_SCRATCH/mirror$i.img" --size "$((cache_mib * 2 / 1024 + 1))G" ||
            die "lcfs mkfs for mirror $i failed"
        RUST_LOG=${RUST_LOG:-info} "$LCFS_BIN" --control-socket "$dir/run/control.sock" daemon \
            --device "$E2E_SCRATCH/mirror$i.img" --mount "$dir/mnt" --no-containerd --no-seal \
            --stats-socket "$dir/run/stats.sock" --mirror-config "$dir/mirror.toml" \
            >"$dir/daemon.log" 2>&1 &
        MIRROR_PIDS+=($!)
    done
    for ((i = 0; i < n; i++)); do
        waited=0
        until curl -fsS "http://127.0.0.1:${MIRROR_PORTS[$i]}/v2/" >/dev/null 2>&1; do
            [[ $waited -lt 300 ]] || die "mirror $i did not answer: $(tail -n 5 "$E2E_WORK/mirror$i/daemon.log")"
            waited=$((waited + 1))
            sleep 0.1
        done
    done
}

# mirror_ctl I ARGS: lcfs ARGS against mirror daemon I.
mirror_ctl() {
    local i=$1
    shift
    "$LCFS_BIN" --control-socket "$E2E_WORK/mirror$i/run/control.sock" "$@"
}

# mirrors_stop: the mirror daemons mirrors_start started, by pid.
mirrors_stop() {
    local pid
    for pid in "${MIRROR_PIDS[@]}"; do
        stop_pid "$pid" || true
    done
    MIRROR_PIDS=()
}
