#!/usr/bin/env bash
# Installs the systems `benches/side_by_side.py` measures next to ARL (as root, idempotent):
# bubblewrap, runc/containerd (with ctr), Debian's docker.io, SWE-ReX from PyPI into the
# project's .venv, and the root filesystems of the peers' images, built without a registry:
#   $WORK/busybox.tar  busybox-static and its applets (docker exec's container)
#   $WORK/swerex.tar   Debian bookworm minbase + python3 + SWE-ReX (SWE-ReX's docker deployment)
# The bench `docker import`s them once dockerd answers. `--no-swerex-image` skips the second
# (mmdebstrap, ~20-30 s); `--no-docker` skips installing docker.io.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${ARL_PEERS_WORK:-/var/tmp/arl-peers}
SWEREX=swe-rex==1.4.0
swerex_image=1
docker=1
for arg in "$@"; do
  case "$arg" in
    --no-swerex-image) swerex_image="" ;;
    --no-docker) docker="" ;;
    *) echo "setup-peers: unknown argument $arg" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" != 0 ]; then
  echo "setup-peers: run as root" >&2
  exit 1
fi

. scripts/packages.sh
pkgs=(bubblewrap containerd runc busybox-static)
[ -n "$swerex_image" ] && pkgs+=(mmdebstrap)
[ -n "$docker" ] && ! command -v dockerd >/dev/null && pkgs+=(docker.io)
ensure_packages "${pkgs[@]}"

[ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
# swe-rex 1.4.0 imports aiohttp in its remote runtime (the docker deployment's client) without
# declaring it.
.venv/bin/pip install -q --disable-pip-version-check "$SWEREX" aiohttp

mkdir -p "$WORK"
if [ ! -s "$WORK/busybox.tar" ]; then
  rootfs=$(mktemp -d)
  mkdir -p "$rootfs"/{bin,proc,sys,dev,tmp,etc,root}
  cp /bin/busybox "$rootfs/bin/"
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$rootfs/bin/$a"; done
  echo 'root:x:0:0:root:/root:/bin/sh' > "$rootfs/etc/passwd"
  echo 'root:x:0:' > "$rootfs/etc/group"
  chmod 1777 "$rootfs/tmp"
  tar -C "$rootfs" --numeric-owner -cf "$WORK/busybox.tar.part" .
  mv "$WORK/busybox.tar.part" "$WORK/busybox.tar"
  rm -rf "$rootfs"
fi

if [ -n "$swerex_image" ] && [ ! -s "$WORK/swerex.tar" ]; then
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  mmdebstrap --quiet --variant=minbase --include=python3 \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' bookworm "$rootfs"
  # SWE-ReX and its dependencies for the image's python3 (the same 3.11 as the host's), from
  # PyPI by the host's pip; the server is started as `swerex-remote` (what the deployment runs).
  /usr/bin/python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' ||
    { echo "setup-peers: the host python must be 3.11 like bookworm's to install for the image" >&2; exit 1; }
  .venv/bin/pip install -q --disable-pip-version-check --target "$rootfs/opt/swerex" "$SWEREX"
  printf '#!/bin/sh\nPYTHONPATH=/opt/swerex exec python3 -m swerex.server "$@"\n' > "$rootfs/usr/local/bin/swerex-remote"
  chmod 755 "$rootfs/usr/local/bin/swerex-remote"
  tar -C "$rootfs" --numeric-owner -cf "$WORK/swerex.tar.part" .
  mv "$WORK/swerex.tar.part" "$WORK/swerex.tar"
fi
echo "setup-peers: bubblewrap, runc, ctr, SWE-ReX ($SWEREX) ready; image root filesystems in $WORK"
