#!/usr/bin/env bash
# Prepares containerd for the `containerd` runtime tests (as root, idempotent, a few seconds):
# installs containerd and runc if missing, starts containerd in the background when its socket
# does not answer (no systemd needed), and imports the registry-free test image
# docker.io/arl/test:latest into the containerd namespace `arl`. The image is busybox-static and
# nothing else: no C library (the bind-mounted agent is a static binary).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=docker.io/arl/test:latest
SOCKET=${ARL_CONTAINERD_SOCKET:-/run/containerd/containerd.sock}
WORK=${ARL_CONTAINERD_WORK:-/var/tmp/arl-containerd}

if [ "$(id -u)" != 0 ]; then
  echo "containerd.sh: run as root" >&2
  exit 1
fi

# docker-registry: the CNCF distribution server the pull tests push to and pull from.
. scripts/packages.sh
ensure_packages containerd runc busybox-static docker-registry

# ctr waits up to 10 s for a socket nobody listens on: bound each probe.
answers() { [ -S "$SOCKET" ] && timeout 2 ctr --address "$SOCKET" version >/dev/null 2>&1; }

mkdir -p "$WORK"
if ! answers; then
  cat > "$WORK/containerd.toml" <<TOML
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "$SOCKET"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
TOML
  nohup containerd --config "$WORK/containerd.toml" >"$WORK/containerd.log" 2>&1 </dev/null &
  for _ in $(seq 200); do answers && break; sleep 0.05; done
  answers || { tail -20 "$WORK/containerd.log" >&2; exit 1; }
fi

# mkoci ROOTFS REF OUT.tar: a single-layer OCI archive, deterministic, with no extra tools.
mkoci() {
  local rootfs=$1 ref=$2 out=$3
  local w; w=$(mktemp -d); mkdir -p "$w/blobs/sha256"
  tar -C "$rootfs" --numeric-owner --sort=name --mtime=2020-01-01 -cf "$w/layer.tar" .
  local diffid; diffid=$(sha256sum "$w/layer.tar" | cut -d' ' -f1)
  gzip -n -1 "$w/layer.tar"
  local ld ls cd cs md ms
  ld=$(sha256sum "$w/layer.tar.gz" | cut -d' ' -f1); ls=$(stat -c %s "$w/layer.tar.gz"); mv "$w/layer.tar.gz" "$w/blobs/sha256/$ld"
  printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$diffid" > "$w/c"
  cd=$(sha256sum "$w/c" | cut -d' ' -f1); cs=$(stat -c %s "$w/c"); mv "$w/c" "$w/blobs/sha256/$cd"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' "$cd" "$cs" "$ld" "$ls" > "$w/m"
  md=$(sha256sum "$w/m" | cut -d' ' -f1); ms=$(stat -c %s "$w/m"); mv "$w/m" "$w/blobs/sha256/$md"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' "$md" "$ms" "$ref" "${ref##*:}" > "$w/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' > "$w/oci-layout"
  tar -C "$w" -cf "$out" oci-layout index.json blobs && rm -rf "$w"
}

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs"/{bin,proc,sys,dev,tmp,etc,root,workspace}
cp /bin/busybox "$rootfs/bin/"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$rootfs/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$rootfs/etc/passwd"
echo 'root:x:0:' > "$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
mkoci "$rootfs" "$IMAGE" "$WORK/test-image.tar"
ctr --address "$SOCKET" -n arl image import "$WORK/test-image.tar" >/dev/null
echo "containerd.sh: containerd answers on $SOCKET; $IMAGE imported into namespace arl"
