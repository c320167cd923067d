#!/usr/bin/env bash
# Container test, following ../shared/CONTAINERS.md: builds the image's runtime stage from the host's
# release binary with podman, writes the image's CycloneDX SBOM (binary and Debian packages) to
# target/sbom/, runs it with a host folder as /data (TLS with a self-signed certificate, metrics
# on), waits for its HEALTHCHECK, binds and stores a credential through it,
# reloads the certificate with SIGHUP, restarts it and fetches the credential again, and checks
# that it runs as non-root and leaves nothing world-readable in /data. Cleans up its container and
# files; keeps the base image and the built image as a build cache.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
t0=$(date +%s)
log() { echo "[docker/test.sh +$(( $(date +%s) - t0 ))s] $*"; }

# --- tools (idempotent: nothing to do when installed) ----------------------------------------
missing=()
for tool in podman runc debootstrap curl openssl python3; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap curl openssl python3 >/dev/null
fi

work=$(mktemp -d /tmp/keyholder-container.XXXXXX)
name="keyholder-test-$$"
image=localhost/keyholder:test
# podman's defaults ask for rlimits and cgroups that this sandbox refuses:
printf '[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\n' > "$work/containers.conf"
export CONTAINERS_CONF="$work/containers.conf"
podman=(podman --runtime runc)

cleanup() {
    local rc=$?
    if [ $rc -ne 0 ]; then
        [ -s "$work/podman.log" ] && { echo "--- podman ---"; tail -20 "$work/podman.log"; }
        if "${podman[@]}" container exists "$name" 2>/dev/null; then
            echo "--- container log ---"; "${podman[@]}" logs "$name" 2>&1 | tail -40 || true
        fi
    fi
    "${podman[@]}" rm -f -t 5 "$name" >/dev/null 2>&1 || true
    rm -rf "$work"
    exit $rc
}
trap cleanup EXIT

# --- base image: no registry can be reached, so make debian:bookworm-slim from the mirror -------
if ! "${podman[@]}" image exists docker.io/library/debian:bookworm-slim; then
    log "creating the debian:bookworm-slim base image with debootstrap (about a minute)"
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log"; exit 1; }
    tar -C "$work/rootfs" -c . | "${podman[@]}" import - docker.io/library/debian:bookworm-slim >/dev/null
    rm -rf "$work/rootfs"
fi

# --- binary and image -----------------------------------------------------------------------
# KEYHOLDER_TEST_BINARY=<path> uses that binary instead (a quicker debug build while iterating).
binary=${KEYHOLDER_TEST_BINARY:-}
if [ -z "$binary" ]; then
    log "building the release binary (no-op when up to date)"
    cargo build --release --locked -p keyholder --quiet
    binary=${CARGO_TARGET_DIR:-$root/target}/release/keyholder
fi
mkdir -p "$work/context"
cp "$binary" "$work/context/keyholder"
log "building the runtime-prebuilt stage"
# --format docker keeps HEALTHCHECK (the OCI format has no field for it).
"${podman[@]}" build --quiet --network host --pull=never --format docker \
    --build-arg VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)" \
    --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    -f docker/Dockerfile --target runtime-prebuilt -t "$image" "$work/context" >/dev/null

# --- the image's SBOM: the binary's CycloneDX SBOM (.ci/release.sh) plus the Debian packages -----
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
sbom_dir=${CARGO_TARGET_DIR:-$root/target}/sbom
binary_sbom="$sbom_dir/keyholder-$version.cdx.json"
if [ ! -s "$binary_sbom" ]; then
    command -v cargo-cyclonedx >/dev/null 2>&1 \
        || { echo "no $binary_sbom and no cargo-cyclonedx to make it (run .ci/release.sh first)"; exit 1; }
    log "making the binary's SBOM"
    cargo cyclonedx --manifest-path keyholder/Cargo.toml --format json --spec-version 1.5 \
        --describe binaries --quiet
    mkdir -p "$sbom_dir" && mv keyholder/keyholder_bin.cdx.json "$binary_sbom" && rm -f ./*/*_bin.cdx.json
fi
sbom_venv=${CARGO_TARGET_DIR:-$root/target}/sbom-venv
if ! "$sbom_venv/bin/python" -c 'import cyclonedx.validation.json' 2>/dev/null; then
    log "installing cyclonedx-python-lib into $sbom_venv"
    python3 -m venv "$sbom_venv"
    "$sbom_venv/bin/pip" install -q "cyclonedx-python-lib[json-validation]==11.12.0"
fi
log "listing the image's Debian packages for its SBOM"
# dpkg's own database inside the image, with the DEP-5 licence names of each copyright file.
"${podman[@]}" run --rm --network none --entrypoint /bin/sh "$image" -c '
    dpkg-query -W -f "\${Package}\t\${Version}\t\${Architecture}\t\${source:Package}\t\${source:Version}\n" |
    while IFS="$(printf "\t")" read -r p v a s sv; do
        l=$(grep -h "^License:" "/usr/share/doc/$p/copyright" 2>/dev/null | sed "s/^License: *//" | sort -u | paste -sd, -)
        printf "%s\t%s\t%s\t%s\t%s\t%s\n" "$p" "$v" "$a" "$s" "$sv" "$l"
    done' > "$work/dpkg.tsv" 2>>"$work/podman.log"
"$sbom_venv/bin/python" docker/image_sbom.py "$binary_sbom" "$work/dpkg.tsv" "$image" \
    "$("${podman[@]}" image inspect -f '{{.Id}}' "$image")" "$version" "$sbom_dir/keyholder-image-$version.cdx.json"

# --- host side: data folder, master key secret, certificate ----------------------------------
uid=10001
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/data" "$work/secrets" "$work/tls"
chown "$uid:$uid" "$work/data" && chmod 0700 "$work/data"
head -c 32 /dev/urandom | base64 > "$work/secrets/master.key"
make_cert() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=keyholder test" -addext "subjectAltName=IP:127.0.0.1" \
        -keyout "$work/tls/key.pem" -out "$work/tls/cert.pem" 2>/dev/null
    chown "$uid:$uid" "$work/tls/key.pem" "$work/tls/cert.pem"
    chmod 0400 "$work/tls/key.pem"
}
make_cert
cp "$work/tls/cert.pem" "$work/ca-first.pem"
chown "$uid:$uid" "$work/secrets/master.key" && chmod 0400 "$work/secrets/master.key"
base="https://127.0.0.1:$port"

log "starting the container on port $port (metrics on $metrics_port)"
"${podman[@]}" run -d --name "$name" --network host \
    -v "$work/data:/data" \
    -v "$work/secrets/master.key:/run/secrets/keyholder_master_key:ro" \
    -v "$work/tls:/run/tls:ro" \
    -e KEYHOLDER_LISTEN="127.0.0.1:$port" \
    -e KEYHOLDER_MASTER_KEY_FILE=/run/secrets/keyholder_master_key \
    -e KEYHOLDER_PUBLIC_URL=https://keyholder.example.org \
    -e KEYHOLDER_TLS_CERT=/run/tls/cert.pem -e KEYHOLDER_TLS_KEY=/run/tls/key.pem \
    -e KEYHOLDER_METRICS_LISTEN="127.0.0.1:$metrics_port" \
    "$image" >/dev/null 2>>"$work/podman.log"

# Without systemd podman cannot schedule the HEALTHCHECK itself (it logs that into podman.log);
# `podman healthcheck run` runs the image's own check command on demand.
wait_healthy() {
    for _ in $(seq 1 100); do
        if "${podman[@]}" healthcheck run "$name" >/dev/null 2>&1; then return 0; fi
        sleep 0.3
    done
    echo "the container's HEALTHCHECK never passed"; return 1
}
wait_healthy
log "healthy"

log "binding and storing a credential through the container"
"${podman[@]}" exec "$name" keyholder bind --json \
    | KEYHOLDER_TEST_CA="$work/ca-first.pem" python3 docker/play_platform.py bind-store "$base" "$work/secret"

log "checking: non-root, private files, metrics"
inner_uid=$("${podman[@]}" exec "$name" id -u)
[ "$inner_uid" != 0 ] || { echo "the server runs as root in the container"; exit 1; }
pid=$("${podman[@]}" inspect -f '{{.State.Pid}}' "$name")
host_uid=$(awk '/^Uid:/{print $2}' "/proc/$pid/status")
[ "$host_uid" = "$uid" ] || { echo "the server process runs as uid $host_uid, not $uid"; exit 1; }
readable=$(find "$work/data" -mindepth 1 -perm /o=rwx)
[ -z "$readable" ] || { echo "world-accessible files in /data:"; echo "$readable"; exit 1; }
[ -n "$(find "$work/data" -name keyholder.db)" ] || { echo "no database in /data"; exit 1; }
[ -z "$(find "$work/data" -name master.key)" ] || { echo "master key written into /data"; exit 1; }
metrics=$(curl -fsS "http://127.0.0.1:$metrics_port/metrics")
for family in keyholder_http_requests_total keyholder_db_commit_duration_seconds_bucket; do
    grep -q "^$family" <<<"$metrics" || { echo "metrics lack $family"; exit 1; }
done

log "SIGHUP with a new certificate"
make_cert
"${podman[@]}" kill --signal HUP "$name" >/dev/null
for _ in $(seq 1 50); do
    "${podman[@]}" logs "$name" 2>&1 | grep -q "certificate reloaded" && break
    sleep 0.2
done
"${podman[@]}" logs "$name" 2>&1 | grep -q "certificate reloaded" || { echo "no reload after SIGHUP"; exit 1; }
served=$(openssl s_client -connect "127.0.0.1:$port" </dev/null 2>/dev/null | openssl x509 -fingerprint -sha256 -noout)
expected=$(openssl x509 -in "$work/tls/cert.pem" -fingerprint -sha256 -noout)
[ "$served" = "$expected" ] || { echo "served certificate is not the reloaded one"; exit 1; }
if openssl s_client -connect "127.0.0.1:$port" -tls1_1 -cipher 'DEFAULT:@SECLEVEL=0' </dev/null >/dev/null 2>&1; then
    echo "TLS 1.1 accepted"; exit 1
fi

log "restarting (SIGTERM, graceful) and fetching the credential again"
"${podman[@]}" restart -t 20 "$name" >/dev/null 2>>"$work/podman.log"
wait_healthy
KEYHOLDER_TEST_CA="$work/tls/cert.pem" python3 docker/play_platform.py fetch "$base" "$work/secret"
"${podman[@]}" stop -t 20 "$name" >/dev/null 2>>"$work/podman.log"
code=$("${podman[@]}" inspect -f '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || { echo "exit code $code after SIGTERM"; exit 1; }
# The container's last lines can reach its log a moment after `podman stop` returns.
stopped=no
for _ in $(seq 1 25); do
    if "${podman[@]}" logs "$name" 2>&1 | grep -q "keyholder stopped"; then stopped=yes; break; fi
    sleep 0.2
done
[ "$stopped" = yes ] || { echo "no graceful stop in the log"; exit 1; }

# --- two replicas of the image on one PostgreSQL behind HAProxy (docker/compose.ha.yml's setup) ----
# The compose file itself cannot run here (no compose engine, and the postgres and haproxy images
# cannot be pulled), so the same pieces run as it wires them: the host's PostgreSQL, two containers
# of this image with the compose file's environment and one master key secret, and the host's
# HAProxy with docker/ha/haproxy.cfg (addresses rewritten to loopback ports).
if [ -z "${KEYHOLDER_TEST_DATABASE_URL:-}" ]; then
    log "KEYHOLDER_TEST_DATABASE_URL is not set: the two-replica part is skipped (.ci/run sets it)"
else
    command -v haproxy >/dev/null 2>&1 || {
        log "installing haproxy"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
    }
    ha_db="kh_container_$$"
    psql -q "$KEYHOLDER_TEST_DATABASE_URL" -c "CREATE DATABASE $ha_db" >/dev/null
    replicas_cleanup() {
        local rc=$?
        for replica in a b; do
            if [ $rc -ne 0 ] && "${podman[@]}" container exists "$name-$replica" 2>/dev/null; then
                echo "--- replica $replica log ---"; "${podman[@]}" logs "$name-$replica" 2>&1 | tail -20 || true
            fi
            "${podman[@]}" rm -f -t 5 "$name-$replica" >/dev/null 2>&1 || true
        done
        [ $rc -ne 0 ] && [ -s "$work/haproxy.log" ] && { echo "--- haproxy ---"; tail -20 "$work/haproxy.log"; }
        [ -n "${haproxy_pid:-}" ] && kill "$haproxy_pid" 2>/dev/null
        psql -q "$KEYHOLDER_TEST_DATABASE_URL" -c "DROP DATABASE IF EXISTS $ha_db WITH (FORCE)" >/dev/null 2>&1 || true
        return $rc
    }
    trap 'replicas_cleanup; cleanup' EXIT
    # The role and password of the test URL; the password reaches the replicas as a secret file.
    read -r pg_user pg_password pg_host pg_port < <(python3 -c '
import sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
print(u.username, urllib.parse.unquote(u.password or ""), u.hostname, u.port or 5432)' "$KEYHOLDER_TEST_DATABASE_URL")
    printf '%s' "$pg_password" > "$work/secrets/pg_password"
    chown "$uid:$uid" "$work/secrets/pg_password" && chmod 0400 "$work/secrets/pg_password"
    free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
    declare -A replica_port=([a]=$(free_port) [b]=$(free_port))
    lb_port=$(free_port)
    start_replica() {
        local replica=$1
        mkdir -p "$work/data-$replica" && chown "$uid:$uid" "$work/data-$replica" && chmod 0700 "$work/data-$replica"
        "${podman[@]}" rm -f -t 5 "$name-$replica" >/dev/null 2>&1 || true
        "${podman[@]}" run -d --name "$name-$replica" --network host \
            -v "$work/data-$replica:/data" \
            -v "$work/secrets/master.key:/run/secrets/keyholder_master_key:ro" \
            -v "$work/secrets/pg_password:/run/secrets/pg_password:ro" \
            -e KEYHOLDER_LISTEN="127.0.0.1:${replica_port[$replica]}" \
            -e KEYHOLDER_PUBLIC_URL=https://keyholder.example.org \
            -e KEYHOLDER_MASTER_KEY_FILE=/run/secrets/keyholder_master_key \
            -e KEYHOLDER_DATABASE_URL="postgres://$pg_user@$pg_host:$pg_port/$ha_db?sslmode=disable" \
            -e KEYHOLDER_DATABASE_PASSWORD_FILE=/run/secrets/pg_password \
            -e KEYHOLDER_TRUSTED_PROXY=127.0.0.0/8 \
            -e KEYHOLDER_NODE_ID="keyholder-$replica" \
            "$image" >/dev/null 2>>"$work/podman.log"
        local healthy=no
        for _ in $(seq 1 100); do
            if "${podman[@]}" healthcheck run "$name-$replica" >/dev/null 2>&1; then healthy=yes; break; fi
            sleep 0.3
        done
        [ "$healthy" = yes ] || { echo "replica $replica never healthy:"; "${podman[@]}" logs "$name-$replica" 2>&1 | tail -30; exit 1; }
    }
    log "starting replicas a (:${replica_port[a]}) and b (:${replica_port[b]}) on database $ha_db"
    start_replica a
    start_replica b
    sed -e "s/^\( *bind \):8080/\1127.0.0.1:$lb_port/" \
        -e "s/keyholder-a:8080/127.0.0.1:${replica_port[a]}/" \
        -e "s/keyholder-b:8080/127.0.0.1:${replica_port[b]}/" docker/ha/haproxy.cfg > "$work/haproxy.cfg"
    grep -q "127.0.0.1:$lb_port" "$work/haproxy.cfg" && grep -q "127.0.0.1:${replica_port[b]}" "$work/haproxy.cfg" \
        || { echo "docker/ha/haproxy.cfg no longer has the lines this test rewrites"; exit 1; }
    haproxy -c -q -f "$work/haproxy.cfg"
    haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
    haproxy_pid=$!
    lb="http://127.0.0.1:$lb_port"
    for _ in $(seq 1 50); do curl -fsS "$lb/v1/health" >/dev/null 2>&1 && break; sleep 0.2; done

    log "binding on replica a, storing through the balancer, fetching from each replica"
    "${podman[@]}" exec "$name-a" keyholder bind --json \
        | python3 docker/play_platform.py bind-store "$lb" "$work/secret-ha"
    for replica in a b; do
        python3 docker/play_platform.py fetch "http://127.0.0.1:${replica_port[$replica]}" "$work/secret-ha" >/dev/null
    done

    log "replica a killed: the balancer keeps serving from b"
    "${podman[@]}" kill "$name-a" >/dev/null
    sleep 2.5   # two failed health checks, one second apart (haproxy.cfg: inter 1s fall 2)
    for _ in 1 2 3 4; do
        python3 docker/play_platform.py fetch "$lb" "$work/secret-ha" >/dev/null
    done
    log "replica a restarted: it rejoins with everything b holds"
    start_replica a
    python3 docker/play_platform.py fetch "http://127.0.0.1:${replica_port[a]}" "$work/secret-ha" >/dev/null
    [ -z "$(find "$work/data-a" "$work/data-b" -name keyholder.db)" ] \
        || { echo "a replica on PostgreSQL wrote a SQLite database into /data"; exit 1; }
fi

log "container test passed in $(( $(date +%s) - t0 ))s"
