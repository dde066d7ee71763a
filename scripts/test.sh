#!/usr/bin/env bash
# The test command: sets up a fresh machine, then runs every check and test. Tests start real
# daemons with real sandboxes (namespaces, cgroups), so this runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# Kubernetes manifests: rendered, schema-checked, custom resources against the CRDs.
scripts/validate-k8s.sh
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo build --locked
# containerd in the background (if not running) and the registry-free test image.
scripts/containerd.sh
# The image: the FROM-scratch target packs the static binary; it must run.
scripts/docker-image.sh
cargo test --locked
# The build names its target (a static binary, see .cargo/config.toml), so it lands under it.
export ARL_BIN="$PWD/target/${CARGO_BUILD_TARGET:-x86_64-unknown-linux-gnu}/debug/arl"
# The sync SDK is generated from the async one: fail when the generated files are stale.
.venv/bin/python sdk/python/scripts/unasync.py --check
.venv/bin/python -m pytest sdk/python/tests -q
.venv/bin/python -m pytest tests/api -q
# The real PyPI `e2b` SDK against the node's E2B-compatible endpoint, in two generations: the
# newest, and the oldest that honours E2B_SANDBOX_URL (its own venv). Tests an older SDK cannot
# run are marked so, with the reason (-rsx lists them).
.venv/bin/python -m pytest tests/e2b -q
.venv-e2b-old/bin/python -m pytest tests/e2b -q -rsx
# Property-based: schemathesis against a token-protected daemon (bounded to a minute).
tests/api/schemathesis.sh
# The side-by-side bench in quick mode (a few iterations of each measurement, the Rust half in
# the dev profile): it fails unless every floor, ARL measurement and peer produced a number.
# SWE-ReX's docker image (mmdebstrap, ~30 s) is left to full runs; quick mode says so.
scripts/setup-peers.sh --no-swerex-image
.venv/bin/python benches/side_by_side.py --quick --check
