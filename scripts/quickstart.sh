#!/usr/bin/env bash
# The main job in one command: build ARL, start the node daemon with its embedded default pool
# (process runtime, warm sandboxes), run code in a sandbox, and stop the daemon again.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --locked
arl=target/${CARGO_BUILD_TARGET:-x86_64-unknown-linux-gnu}/release/arl
state=$(mktemp -d)
export ARL_ENDPOINTS=http://127.0.0.1:8420

"$arl" node --listen 127.0.0.1:8420 --state-dir "$state" &
node=$!
trap 'kill -TERM $node 2>/dev/null; wait $node 2>/dev/null; rm -rf "$state"' EXIT

for _ in $(seq 100); do
  "$arl" pools >/dev/null 2>&1 && break
  kill -0 $node 2>/dev/null || { echo "quickstart: the daemon exited" >&2; exit 1; }
  sleep 0.1
done
"$arl" pools

echo '--- a sandbox runs Python:'
"$arl" run -- python3 -c 'import os, platform; print(f"hello from {platform.node()}: uid {os.getuid()}, pid {os.getpid()}, cwd {os.getcwd()}")'

echo '--- the Python SDK, 20 commands in one warm sandbox:'
.venv/bin/python - <<'PY'
import time
import arl

with arl.Client() as client, client.sandbox("default") as sb:
    sb.write_files({"solution.py": "def add(a, b):\n    return a + b\n", "test_solution.py": "from solution import add\nassert add(2, 3) == 5\nprint('tests pass')\n"})
    print(sb.exec(["python3", "test_solution.py"]).stdout, end="")
    start = time.perf_counter()
    for _ in range(20):
        sb.exec(["true"])
    print(f"20 execs of `true`: {(time.perf_counter() - start) / 20 * 1000:.2f} ms each")
PY
