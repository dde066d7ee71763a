#!/usr/bin/env bash
# The test command: sets up a fresh machine, then runs every check and test. Tests start real
# daemons with real sandboxes (namespaces, cgroups), so this runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo build --locked
# containerd in the background (if not running) and the registry-free test image.
scripts/containerd.sh
cargo test --locked
ARL_BIN="$PWD/target/debug/arl" .venv/bin/python -m pytest sdk/python/tests -q
ARL_BIN="$PWD/target/debug/arl" .venv/bin/python -m pytest tests/api -q
