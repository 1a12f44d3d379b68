#!/usr/bin/env bash
# The main job end to end, on the embedded default:
#   1. a registry on loopback, with a sample image built offline (busybox + 2 layers);
#   2. lazypod converts it into a local directory repository;
#   3. podman, with a fresh storage root, runs it from the repository;
#   4. the registry's log shows that nothing was fetched during the run.
# Everything lives under .demo/ (removed first); set DEMO_PORT to move the registry.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

DEMO="$PWD/.demo"
PORT="${DEMO_PORT:-5042}"
REGISTRY="127.0.0.1:$PORT"
IMAGE="$REGISTRY/demo/hello:1"
RUNROOT="$(mktemp -d /tmp/lazypod-demo-XXXXXX)"

podman_cmd() {  # podman with private storage, never the machine's
    local root="$1"; shift
    podman --root "$DEMO/$root" --runroot "$RUNROOT/$root" --storage-driver overlay "$@"
}
cleanup() {
    podman_cmd build-storage rm -af >/dev/null 2>&1 || true
    podman_cmd run-storage rm -af >/dev/null 2>&1 || true
    [ -n "${REGISTRY_PID:-}" ] && kill "$REGISTRY_PID" 2>/dev/null || true
    rm -rf "$RUNROOT"
}
trap cleanup EXIT

rm -rf "$DEMO"
mkdir -p "$DEMO"
# This sandbox's podman needs these two settings (harmless elsewhere).
cat > "$DEMO/containers.conf" <<'CONF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$DEMO/containers.conf"

echo "== 1. registry on $REGISTRY, sample image built offline"
cat > "$DEMO/registry.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $DEMO/registry-data
http:
  addr: $REGISTRY
log:
  accesslog:
    disabled: false
YML
docker-registry serve "$DEMO/registry.yml" > "$DEMO/registry.log" 2>&1 &
REGISTRY_PID=$!
for _ in $(seq 50); do
    curl -sf "http://$REGISTRY/v2/" >/dev/null 2>&1 && break
    python3 -c "import urllib.request; urllib.request.urlopen('http://$REGISTRY/v2/')" \
        >/dev/null 2>&1 && break
    sleep 0.1
done

mkdir -p "$DEMO/rootfs/bin"
cp /bin/busybox "$DEMO/rootfs/bin/busybox"
for applet in sh cat ls echo; do ln -sf busybox "$DEMO/rootfs/bin/$applet"; done
tar -C "$DEMO/rootfs" -cf "$DEMO/rootfs.tar" .
podman_cmd build-storage import -q "$DEMO/rootfs.tar" localhost/busybox-base >/dev/null
cat > "$DEMO/Containerfile" <<'CF'
FROM localhost/busybox-base
RUN mkdir -p /etc && echo "hello from a lazypod repository" > /etc/motd
RUN echo "second layer" > /etc/layer2 && rm /etc/motd && echo "motd rewritten in layer 2" > /etc/motd
CMD ["/bin/cat", "/etc/motd"]
CF
podman_cmd build-storage build -q --network=none -t "$IMAGE" -f "$DEMO/Containerfile" "$DEMO" >/dev/null
podman_cmd build-storage push -q --tls-verify=false "$IMAGE"

echo "== 2. convert into $DEMO/repo"
.venv/bin/lazypod convert-single-image --insecure-registry "$REGISTRY" "$IMAGE" "$DEMO/repo"

echo "== 3. podman runs it from the repository (fresh storage root, no pull)"
.venv/bin/lazypod podman-config --rootful "$DEMO/repo"
mark=$(wc -l < "$DEMO/registry.log")
podman_cmd run-storage --storage-opt "additionalimagestore=$DEMO/repo/.podmanStore" \
    run --rm --network=none "$IMAGE"

echo "== 4. registry requests during the run:"
requests=$(tail -n +"$((mark + 1))" "$DEMO/registry.log" | grep -c '"GET /v2/' || true)
echo "   $requests (layers came from $DEMO/repo/.layers)"
[ "$requests" -eq 0 ]
