#!/usr/bin/env bash
# Same-run A/B of two `arl` binaries through the daemon's own benches (exec latency, acquire
# and burst, refill, idle memory, throughput): each bench runs against BEFORE and AFTER in
# turn, the order alternating each round, so both see the same machine. The benches start the
# binary named by ARL_BIN; everything else (client, floors) is this tree's.
#
#   sudo benches/ab_benches.sh BEFORE_BIN AFTER_BIN [ROUNDS] [BENCH...]
#
# Prints each run's RESULT lines, tagged, and keeps the full logs in target/ab-benches/.
set -euo pipefail
cd "$(dirname "$0")/.."

before=${1:?BEFORE_BIN}
after=${2:?AFTER_BIN}
rounds=${3:-2}
shift $(($# < 3 ? $# : 3))
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(exec_latency acquire refill idle_memory throughput)

out=target/ab-benches
mkdir -p "$out"
cargo bench --locked --no-run >/dev/null 2>&1 || cargo bench --locked --no-run

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
    "$(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ)"
for round in $(seq 1 "$rounds"); do
    for bench in "${benches[@]}"; do
        # Odd rounds run BEFORE first, even rounds AFTER first.
        if [ $((round % 2)) -eq 1 ]; then order=(before after); else order=(after before); fi
        for tag in "${order[@]}"; do
            bin=$before
            [ "$tag" = after ] && bin=$after
            log="$out/$bench.$tag.$round.log"
            ARL_BIN=$bin cargo bench --locked --bench "$bench" >"$log" 2>&1 ||
                { echo "$bench ($tag, round $round) failed: $log" >&2; exit 1; }
            grep '^RESULT' "$log" | sed "s/^/[$bench $tag r$round] /"
        done
    done
done
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
