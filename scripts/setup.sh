#!/usr/bin/env bash
# Installs everything lazypod and its tests need, on Debian 12/13 or Ubuntu 24.04+.
# Idempotent: a second run installs nothing. Needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# podman and friends, the registry the tests and the demo run on loopback, busybox for
# test images, debootstrap for a real-world Debian test image, attr for inspecting xattrs,
# apache2-utils for the registry's htpasswd, xfsprogs for a file system with reflinks.
PACKAGES=(podman runc skopeo fuse-overlayfs uidmap slirp4netns docker-registry debootstrap
          busybox-static attr apache2-utils xfsprogs python3-venv python3-pip ca-certificates)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The distribution's Python: every user can run it (the rootless tests run lazypod as a
# user; a Python under /root would not do).
PYTHON="${PYTHON:-/usr/bin/python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: lazypod needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version))" >&2
    exit 1
fi
if [ "$(cat .venv/.lazypod-python 2>/dev/null)" != "$PYTHON" ]; then
    rm -rf .venv
    "$PYTHON" -m venv .venv
    echo "$PYTHON" > .venv/.lazypod-python
fi
# Reinstall only when the package definition changed since the last install.
stamp=".venv/.lazypod-installed"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ] || ! .venv/bin/lazypod --version >/dev/null 2>&1; then
    if ! .venv/bin/python -m pip install -q -e '.[test]' > .venv/pip.log 2>&1; then
        cat .venv/pip.log >&2
        echo "setup: pip install failed (log above)" >&2
        exit 1
    fi
    echo "$wanted" > "$stamp"
fi

if [ "$(id -u)" -eq 0 ]; then
    # The rootless tests run podman as this user, with subordinate ids of its own.
    # Not uid 1000: the test images own files as 1000, which this user would then own.
    if ! id lazypod-test >/dev/null 2>&1; then
        useradd -m -s /bin/sh -K UID_MIN=20000 -K GID_MIN=20000 lazypod-test
    elif [ "$(id -u lazypod-test)" = 1000 ]; then
        usermod -u 20000 lazypod-test && groupmod -g 20000 lazypod-test
    fi
    for f in /etc/subuid /etc/subgid; do
        grep -q '^lazypod-test:' "$f" 2>/dev/null || echo "lazypod-test:300000:65536" >> "$f"
    done
    # Rootless fuse-overlayfs needs /dev/fuse; Debian makes it 0666, some sandboxes 0600.
    if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != "666" ]; then
        chmod 666 /dev/fuse
    fi
fi
echo "setup: ready ($(.venv/bin/lazypod --version), $(podman --version))"
