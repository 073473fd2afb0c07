#!/usr/bin/env bash
# Builds zeroline as a managed (v2) Docker logging plugin without any registry, and enables it:
#   bash scripts/build-managed-plugin.sh [NAME]     (default NAME: zeroline-managed)
#   bash scripts/build-managed-plugin.sh --remove [NAME]   disable and remove the plugin
#
# 1. a Debian rootfs: `debootstrap --variant=minbase --include=python3,python3-venv bookworm`
#    from the machine's configured Debian mirror (debootstrap is installed with apt-get if
#    missing); kept as a tarball in /var/cache/zeroline when that directory exists, so a second
#    build skips the ~2 minutes this takes;
# 2. the wheels built on the host (`pip wheel . -w dist`: zeroline with its compiled core, and its
#    dependencies) installed into a venv at /opt/zeroline inside the rootfs, with
#    /usr/local/bin/zeroline linked to it (the entrypoint plugin/config.json names);
# 3. plugin/config.json beside the rootfs, then `docker plugin create NAME DIR` and `enable`.
#
# The host's Python must be the rootfs's minor version (bookworm: 3.11), since the wheel carries a
# compiled extension. Users with a registry can build the rootfs from plugin/Dockerfile instead
# (README, "Docker logging plugin"). Needs root and a running engine.
#
# Environment: ZL_PLUGIN_BUILD (work directory, default build/managed-plugin),
# ZL_PLUGIN_CACHE (default /var/cache/zeroline; used only when it exists),
# ZL_DEBIAN_MIRROR (default: the first URIs of /etc/apt/sources.list.d/debian.sources).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "build-managed-plugin.sh: $*" >&2; exit 1; }
say() { echo "build-managed-plugin.sh: $*"; }

if [ "${1:-}" = --remove ]; then
    NAME=${2:-zeroline-managed}
    docker plugin disable -f "$NAME" >/dev/null 2>&1 || true
    docker plugin rm -f "$NAME" >/dev/null 2>&1 || true
    exit 0
fi
NAME=${1:-zeroline-managed}
WORK=${ZL_PLUGIN_BUILD:-build/managed-plugin}
CACHE=${ZL_PLUGIN_CACHE:-/var/cache/zeroline}
SUITE=bookworm
BASE_TAR="$CACHE/rootfs-$SUITE-minbase-python3.tar"
started=$(date +%s)

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, docker plugin create)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (bash scripts/docker-engine.sh start)"
PY=${PYTHON:-python3}
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$pyver" = 3.11 ] || die "the host's $PY is $pyver; the $SUITE rootfs has 3.11 (set PYTHON=...)"

mirror=${ZL_DEBIAN_MIRROR:-}
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
    mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}

rm -rf "$WORK"
mkdir -p "$WORK/plugin/rootfs" "$WORK/dist"
ROOTFS="$WORK/plugin/rootfs"

# -- 1. the rootfs ------------------------------------------------------------------------------
if [ -s "$BASE_TAR" ]; then
    say "rootfs from the cache $BASE_TAR"
    tar -C "$ROOTFS" -xf "$BASE_TAR"
else
    if ! command -v debootstrap >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            debootstrap >/dev/null 2>&1 \
            || { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
                 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                    --no-install-recommends debootstrap >/dev/null; } \
            || die "cannot install debootstrap with apt-get"
    fi
    say "debootstrap $SUITE from $mirror (about 2 minutes)"
    debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$ROOTFS" "$mirror" \
        >"$WORK/debootstrap.log" 2>&1 || die "debootstrap failed (see $WORK/debootstrap.log)"
    # Package caches are of no use inside a plugin.
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    if [ -d "$CACHE" ]; then
        tar -C "$ROOTFS" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
        say "rootfs cached as $BASE_TAR"
    fi
fi

# -- 2. wheels built on the host, installed into a venv inside --------------------------------
say "building the wheels (pip wheel . -w dist)"
"$PY" -m pip wheel -q --disable-pip-version-check . -w "$WORK/dist" >"$WORK/wheel.log" 2>&1 \
    || die "pip wheel failed (see $WORK/wheel.log)"
mkdir -p "$ROOTFS/tmp/wheels"
cp "$WORK"/dist/*.whl "$ROOTFS/tmp/wheels/"
chroot "$ROOTFS" /usr/bin/python3 -m venv /opt/zeroline
chroot "$ROOTFS" /opt/zeroline/bin/pip install -q --no-index --disable-pip-version-check \
    --find-links /tmp/wheels zeroline >"$WORK/install.log" 2>&1 \
    || die "installing the wheels in the rootfs failed (see $WORK/install.log)"
rm -rf "$ROOTFS/tmp/wheels"
ln -sf /opt/zeroline/bin/zeroline "$ROOTFS/usr/local/bin/zeroline"
mkdir -p "$ROOTFS/run/docker/plugins" "$ROOTFS/var/lib/zeroline"
# The compiled core must load inside (a silent fall-back to the twin would be 10x slower).
chroot "$ROOTFS" /usr/bin/env ZEROLINE_REQUIRE_EXTENSIONS=1 /usr/local/bin/zeroline --version \
    || die "zeroline does not run inside the rootfs"

# -- 3. the plugin ------------------------------------------------------------------------------
cp plugin/config.json "$WORK/plugin/config.json"
docker plugin disable -f "$NAME" >/dev/null 2>&1 || true
docker plugin rm -f "$NAME" >/dev/null 2>&1 || true
docker plugin create "$NAME" "$WORK/plugin" >/dev/null || die "docker plugin create failed"
docker plugin enable "$NAME" >/dev/null || die "docker plugin enable $NAME failed"
# The engine keeps its own copy of the rootfs; the build tree is not needed any more.
rm -rf "$WORK/plugin"
say "plugin $NAME enabled ($(du -sh "/var/lib/docker/plugins" 2>/dev/null | cut -f1) under \
/var/lib/docker/plugins) in $(( $(date +%s) - started )) s"
