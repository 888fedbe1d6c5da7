#!/usr/bin/env bash
# Run every benchmark of docs/benchmarks.md one after the other (never two at once: they time each other otherwise)
# and keep each script's JSON line in bench/results/<name>.json (stderr in $TMPDIR/daam-bench-logs/<name>.log).
# Arguments: names of runs to do (default: all). About 75 minutes on 2 CPU cores (SDXL alone ~20); set BENCH_SKIP_SDXL=1 to leave the SDXL run out.
# Uses the project venv ($DAAM_CACHE/venv, made by tools/setup_env.sh); the reference venv is made on first use.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/env.sh
logs="${TMPDIR:-/tmp}/daam-bench-logs"
mkdir -p bench/results "$logs"

only=" $* "  # names given on the command line: run only those (e.g. bench/run_all.sh memory compare_reference)
# Wait (up to 15 minutes) until nothing else keeps the CPUs busy: the 1-minute load average under 1.2.
wait_quiet() {
    local i
    for i in $(seq 90); do
        awk '{exit !($1 < 1.2)}' /proc/loadavg && return 0
        (( i == 1 )) && echo "[run_all] waiting for the machine to be quiet (load $(cut -d' ' -f1 /proc/loadavg))" >&2
        sleep 10
    done
    echo "[run_all] still busy (load $(cut -d' ' -f1 /proc/loadavg)): running anyway" >&2
}

run() {
    local name="$1"; shift
    [[ "$only" == "  " || "$only" == *" $name "* ]] || return 0
    wait_quiet
    echo "[run_all] $name: $*" >&2
    "$PY" "$@" 2> "$logs/$name.log" | tail -n 1 > "bench/results/$name.json"
}

run diffusers_sd15_512  bench/overhead_diffusers.py --model sd15 --size 512 --steps 3 --pairs 5 --configs plain,all,f4
run diffusers_sd15_256  bench/overhead_diffusers.py --model sd15 --size 256 --steps 4 --pairs 5 --configs plain,all,f1,f2,f4,f8
run comfy_sd15_512      bench/overhead_comfy.py --size 512 --steps 2 --pairs 5 --configs plain,all,f4
run comfy_sd15_256      bench/overhead_comfy.py --size 256 --steps 4 --pairs 5 --configs plain,all,f4
run memory              bench/memory.py --model tiny --size 512 --steps 10,20,50 --sdxl
run memory_sd15_256     bench/memory.py --model sd15 --size 256 --steps 10,20,50
run compare_reference   bench/compare_reference.py --steps 10,20,40 --pairs 7
run compare_reference_20 bench/compare_reference.py --steps 20 --pairs 11
run attribution         bench/attribution.py --scenes 48 --generated 48
if [[ -z "${BENCH_SKIP_SDXL:-}" ]]; then
    run diffusers_sdxl_1024 bench/overhead_diffusers.py --model sdxl --size 1024 --steps 1 --pairs 5 --configs plain,all
fi
echo "[run_all] results in bench/results/" >&2
