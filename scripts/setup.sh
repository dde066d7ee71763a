#!/usr/bin/env bash
# Installs what ARL needs on a fresh Debian/Ubuntu machine (as root): nothing for the daemon
# itself beyond a Linux kernel with user namespaces and cgroups, plus the tools the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (the process runtime maps each sandbox's root to an unprivileged uid range)" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "setup: no Rust toolchain (cargo) on PATH; install one, e.g. from your distribution" >&2
  exit 1
fi

# Debian packages: a venv-capable python3 for the SDK, procps/util-linux for the tests' probes,
# protoc to build the containerd client, containerd/runc/busybox-static for the containerd tests.
. scripts/packages.sh
ensure_packages python3 python3-venv procps util-linux protobuf-compiler containerd runc busybox-static

# The SDK's virtualenv, from the distribution's python (the one on PATH may be a slow shim).
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e './sdk/python[test]' pyyaml jsonschema openapi-spec-validator \
  'schemathesis==4.32.5' 'kubernetes-validate==1.37.0' 'e2b==2.63.0' 'e2b-code-interpreter==2.11.5'
