#!/usr/bin/env bash
# Builds the image's `prebuilt` target (FROM scratch: no registry needed) from the binary that
# `cargo build` made, and runs `arl --version` in it. Installs Docker (Debian's docker.io) when
# missing and starts dockerd on the running containerd when no daemon answers; stops it after.
set -euo pipefail
cd "$(dirname "$0")/.."

BINARY="target/${CARGO_BUILD_TARGET:-x86_64-unknown-linux-gnu}/debug/arl"
[ -x "$BINARY" ] || { echo "docker-image: $BINARY is missing; run cargo build first" >&2; exit 1; }

. scripts/packages.sh
command -v dockerd >/dev/null || ensure_packages docker.io
DOCKER=docker
command -v "$DOCKER" >/dev/null || DOCKER=/usr/bin/docker

started=""
cleanup() {
  if [ -n "$started" ]; then
    kill "$started" 2>/dev/null || true
    wait "$started" 2>/dev/null || true
  fi
}
trap cleanup EXIT
if ! "$DOCKER" info >/dev/null 2>&1; then
  # Share the machine's containerd (scripts/containerd.sh starts it) instead of a second one.
  dockerd --containerd=/run/containerd/containerd.sock >"${TMPDIR:-/tmp}/arl-dockerd.log" 2>&1 &
  started=$!
  for _ in $(seq 1 150); do
    "$DOCKER" info >/dev/null 2>&1 && break
    kill -0 "$started" 2>/dev/null || { echo "docker-image: dockerd exited:" >&2; tail -20 "${TMPDIR:-/tmp}/arl-dockerd.log" >&2; exit 1; }
    sleep 0.2
  done
  "$DOCKER" info >/dev/null 2>&1 || { echo "docker-image: dockerd did not answer within 30 s" >&2; exit 1; }
fi

# A context holding only the binary: nothing else to send, nothing to pull.
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"; cleanup' EXIT
cp "$BINARY" "$ctx/arl"
tag="arl:ci-$$"
DOCKER_BUILDKIT=0 "$DOCKER" build -q -f Dockerfile --target prebuilt --build-arg ARL_BINARY=arl -t "$tag" "$ctx" >/dev/null
version=$("$DOCKER" run --rm "$tag" --version)
"$DOCKER" rmi -f "$tag" >/dev/null
case "$version" in
  "arl "*) echo "docker-image: the scratch image runs: $version" ;;
  *) echo "docker-image: unexpected output from arl --version: $version" >&2; exit 1 ;;
esac
