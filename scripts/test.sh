#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then lints, type-checks and runs the tests.
# The tests start their own registry and use the real podman, each with private storage.
# Run as root, it then runs the unit suite again as an ordinary user, as umoci runs its
# unpack tests: what lazypod does differently without privilege (src/lazypod/fseval.py)
# is tested both ways.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/mypy
.venv/bin/pytest -q "$@"

[ "$(id -u)" -eq 0 ] || exit 0
# The user scripts/setup.sh makes for the rootless tests (not uid 1000, which the test
# images own files as); made here too if it is missing, with no home of its own.
user=lazypod-test
id "$user" >/dev/null 2>&1 \
    || useradd -M -d /nonexistent -s /usr/sbin/nologin -K UID_MIN=20000 -K GID_MIN=20000 "$user"
# The user gets a copy of the sources and tests (the checkout may sit where others cannot
# enter: /root is 0700), in a fresh directory of its own for pytest's temporary files
# (no cache: nothing is written into the checkout). The venv's packages are used where
# they are when the user can read them, else copied too.
work="$(mktemp -d /tmp/lazypod-unit-XXXXXX)"
trap 'rm -rf "$work"' EXIT
cp -a src tests pyproject.toml "$work/"
python="$(readlink -f .venv/bin/python)"
site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
if ! setpriv --reuid="$user" --regid="$user" --init-groups test -r "$site/pytest/__init__.py"; then
    cp -a "$site" "$work/site-packages"
    site="$work/site-packages"
fi
mkdir "$work/home"
chown -R "$user:" "$work"
chmod 755 "$work"
echo "unit tests as $user (uid $(id -u "$user")):"
cd "$work"
setpriv --reuid="$user" --regid="$user" --init-groups \
    env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$work/home" LANG=C.UTF-8 \
    PYTHONPATH="$work/src:$site" PYTHONDONTWRITEBYTECODE=1 \
    "$python" -m pytest -q -p no:cacheprovider --basetemp="$work/home/pytest" -rs tests/unit
