#!/usr/bin/env bash
# A pytest command on two cores idle, then with two busy processes on the same cores: wall times, CPU
# times and the ratio (issue 16's target: the README's main command within 3x of idle).
#
# Usage (from the repository root):  [REPEAT=n] [CORES=0,1] tools/busy_bench.sh [pytest arguments]
#   no arguments: the README's main command (`python3 -m pytest`, the standard tier);
#   e.g. `tools/busy_bench.sh --tier quick`.
# Everything runs under `taskset -c $CORES` (default 0,1), the spinners too. With REPEAT=n the idle and
# busy runs alternate n times and medians are printed. Logs and journals go to $OUT (or a temporary
# folder, printed); each run's last pytest line is printed with its times (a failed run is still timed).
set -uo pipefail
CORES=${CORES:-0,1}
REPEAT=${REPEAT:-1}
W=${OUT:-$(mktemp -d)}
mkdir -p "$W"
SPINNERS=()
stop_spinners() { for pid in "${SPINNERS[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done; SPINNERS=(); }
trap stop_spinners EXIT INT TERM

run() {  # $1: label, then the pytest arguments; prints "wall cpu last-line-of-the-log"
  local label=$1 start end
  shift
  local log="$W/$label.log"
  start=$(date +%s.%N)
  { TIMEFORMAT='%U %S'; time taskset -c "$CORES" python3 -m pytest -q -p no:cacheprovider \
      --attn-results-file="$W/$label.jsonl" "$@" > "$log" 2>&1; } 2> "$W/$label.cpu"
  end=$(date +%s.%N)
  python3 - "$start" "$end" "$W/$label.cpu" "$log" <<'EOF'
import sys
start, end, cpu, log = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
user, system = (float(x) for x in open(cpu).read().split()[-2:])
last = [line for line in open(log, errors="replace").read().splitlines() if line.strip()]
print(f"{end - start:.1f} {user + system:.1f} {last[-1] if last else '(no output)'}")
EOF
}

echo "cores $CORES; pytest arguments: ${*:-(none: the standard tier)}; logs in $W"
IDLE=() BUSY=()
for i in $(seq 1 "$REPEAT"); do
  echo "load average before idle run $i: $(cut -d' ' -f1-3 /proc/loadavg)"
  line=$(run "idle-$i" "$@"); IDLE+=("${line%% *}")
  echo "  idle $i: wall ${line%% *} s; cpu (user+sys, kernel's process included) $(echo "$line" | cut -d' ' -f2) s; $(echo "$line" | cut -d' ' -f3-)"
  for _ in 1 2; do taskset -c "$CORES" python3 -c 'while True: pass' & SPINNERS+=($!); done
  sleep 1
  echo "load average before busy run $i: $(cut -d' ' -f1-3 /proc/loadavg)"
  line=$(run "busy-$i" "$@"); BUSY+=("${line%% *}")
  stop_spinners
  echo "  busy $i: wall ${line%% *} s; cpu $(echo "$line" | cut -d' ' -f2) s; $(echo "$line" | cut -d' ' -f3-)"
done
python3 - "${IDLE[*]}" "${BUSY[*]}" <<'EOF' | tee "$W/summary.txt"
import statistics, sys
idle, busy = ([float(x) for x in arg.split()] for arg in sys.argv[1:3])
mi, mb = statistics.median(idle), statistics.median(busy)
print(f"idle wall (median of {len(idle)}): {mi:.1f} s; busy (two spinners): {mb:.1f} s; ratio {mb / mi:.2f}x")
print("pairs: " + ", ".join(f"{b / i:.2f}x" for i, b in zip(idle, busy)))
EOF
