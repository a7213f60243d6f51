#!/usr/bin/env bash
# Verification run on a lent GPU machine (no network): install the carried wheels and this project,
# list the backends, run the suite per backend (each with its own journal and wall time), show the
# flash-attn build crashing at a head dim it has no kernel for, and list the backends with PyPI's
# broken xformers wheel. Everything lands in $OUT/results.tar.gz; a short table is printed last.
# Usage: [LIMIT=seconds per backend] [EXTRA="pytest options"] [EXTRAS=0] tools/gpu_verify.sh "backend:tier ..."
# (from the repository root; EXTRAS=0 skips the crash and broken-wheel demonstrations)
set -uo pipefail
W=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$W/install.log" 2>&1 || { cat "$W/install.log"; exit 1; }
{ nvidia-smi -L; python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "triton", triton.__version__)'; } > "$W/machine.txt" 2>&1
python3 -m pytest -p no:cacheprovider --list-backends > "$W/list-backends.txt" 2>&1
save() { tar -czf "$OUT/${NAME:-results}.tar.gz" -C "$W" .; }  # after every step: a run cut short keeps what it did
save
for item in ${1:-}; do
  b=${item%%:*}; tier=${item##*:}
  start=$(date +%s.%N)
  timeout "${LIMIT:-300}" python3 -m pytest -q -p no:cacheprovider --backend="$b" --tier="$tier" --results-file="$W/$b.jsonl" \
    ${EXTRA:-} > "$W/$b.log" 2>&1
  echo "$b $tier rc=$? wall=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")s" >> "$W/times.txt"
  save
done
[ -n "${EXTRAS:-1}" ] && [ "${EXTRAS:-1}" != 0 ] || { save; cat "$W/times.txt"; exit 0; }
# flash-attn declared as plain flash_attn_func (head dims 1-256): head dim 256 has no kernel in this build
python3 -m pytest -q -p no:cacheprovider --pyargs conformance.suite --backend=conformance.backends.flash:attention \
  --check=forward --case=b2_q128_k128_h4_d256_bf16_seed1,b2_q128_k128_h4_d64_bf16_seed2,b2_q128_k128_h4_d128_bf16_seed3 \
  --results-file="$W/flash-d256.jsonl" > "$W/flash-d256.log" 2>&1
# PyPI's xformers wheel, built for torch 2.10 / Python 3.10: imports, then has no usable operator
python3 -m pip install -q --no-index --no-deps --target /tmp/site_broken .whl_broken/*.whl .whl/flash_attn*.whl
PYTHONPATH=/tmp/site_broken python3 -m pytest -p no:cacheprovider --list-backends > "$W/list-backends-broken-xformers.txt" 2>&1
PYTHONPATH=/tmp/site_broken python3 -m xformers.info > "$W/xformers-info-broken.txt" 2>&1
python3 -m xformers.info > "$W/xformers-info.txt" 2>&1
save
cat "$W/machine.txt" "$W/times.txt"
for f in "$W"/*.log; do echo "== $(basename "$f")"; grep -A30 "attention conformance ===" "$f" | grep -v "^results journal" | head -20; tail -1 "$f"; done
