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

# An older SDK generation for the same E2B tests: 2.7.0 is the oldest that honours
# `E2B_SANDBOX_URL` (one plain-HTTP URL for every sandbox), and it still creates with the v1
# shape (`POST /sandboxes`, vendored `e2b_connect` envd client); 1.x needs TLS and wildcard DNS.
if [ ! -x .venv-e2b-old/bin/python ]; then
  /usr/bin/python3 -m venv .venv-e2b-old
fi
# Its wire-level dependencies are pinned too (a later protobuf or httpx may not fit an old SDK).
.venv-e2b-old/bin/pip install -q --disable-pip-version-check 'pytest>=7' 'e2b==2.7.0' \
  'httpx==0.29.0' 'httpcore==1.0.9' 'protobuf==7.36.2'
