#!/usr/bin/env bash
# The GPU check: install what the GPU machine lacks from the carried wheels, run the `cuda` tests and the GPU
# benchmark, and write a summary and the logs into OUT. Budget: <= 8 minutes (tests 5, benchmark 3).
#
#   python scripts/gpu_bundle.py                 # here, once: wheels -> .gpu/carry-1..N (<= 60 MiB each)
#   bash scripts/gpu_check.sh --stage            # on the GPU machine, once per carried part but the last
#   bash scripts/gpu_check.sh OUT                # on the GPU machine, with the last part carried: the check
#   bash scripts/gpu_check.sh --dry-run OUT      # here, on the CPU: the same steps, the tests as a dry run
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
STAGE=/tmp/loraforge-gpu
mode=check
case "${1:-}" in
  --stage) mode=stage; shift ;;
  --dry-run) mode=dry; shift ;;
esac
OUT=${1:-${OUT:-$REPO/gpu-check-out}}
mkdir -p "$STAGE/parts" "$OUT"

stage_parts() {  # keep each carried part outside the work tree: the next call replaces the tree's copy
  for d in .gpu/carry-*; do
    [ -f "$d/part" ] && cp "$d/part" "$STAGE/parts/$(basename "$d")"
  done
  ls -l "$STAGE/parts"
}

if [ "$mode" = stage ]; then stage_parts; exit 0; fi

start=$(date +%s)
log() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/summary.md"; }
echo "# loraforge GPU check ($(date -u +%FT%TZ), mode $mode)" > "$OUT/summary.md"

if [ "$mode" = dry ]; then
  PY=$REPO/.venv/bin/python
  export LORAFORGE_CUDA_DRY_RUN=1
  # The bundle: every requirement covered by the image or a wheel, one version each; the parts reassemble.
  "$PY" scripts/gpu_bundle.py --check > "$OUT/bundle.log" 2>&1 && log "bundle: ok ($(head -c 200 "$OUT/bundle.log"))" \
    || { log "bundle: FAILED (see bundle.log)"; exit 1; }
  if ls .gpu/carry-*/part > /dev/null 2>&1; then
    cat .gpu/carry-*/part | tar -t > "$OUT/bundle-contents.txt" && log "parts reassemble: $(wc -l < "$OUT/bundle-contents.txt") wheels" \
      || { log "parts do not reassemble"; exit 1; }
  fi
  TESTS_TIMEOUT=900; BENCH_ARGS=(--dry-run)
else
  PY=python3
  stage_parts > "$OUT/stage.log" 2>&1
  cat "$STAGE"/parts/carry-* > "$STAGE/bundle.tar" && rm -rf "$STAGE/whl" && tar -xf "$STAGE/bundle.tar" -C "$STAGE" \
    || { log "could not reassemble the carried parts (stage every part first)"; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$STAGE"/whl/*.whl > "$OUT/install.log" 2>&1 || { log "wheel install FAILED (install.log)"; exit 1; }
  export PYTHONPATH=/tmp/site
  log "installed $(ls "$STAGE"/whl | wc -l) wheels into /tmp/site"
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  TESTS_TIMEOUT=300; BENCH_ARGS=(--steps 12 --batch-size 8 --cutoff 1024)
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
[ "$mode" = check ] && export LORAFORGE_CACHE=${LORAFORGE_CACHE:-$STAGE/cache}
"$PY" -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" \
  2>&1 | tee "$OUT/versions.txt" | while read -r line; do log "$line"; done

timeout "$TESTS_TIMEOUT" "$PY" -m pytest -q -m cuda tests/test_cuda.py -rA --junitxml "$OUT/cuda-tests.xml" \
  > "$OUT/cuda-tests.log" 2>&1
rc=$?
log "cuda tests: exit $rc — $(tail -n 1 "$OUT/cuda-tests.log")"
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$OUT/cuda-tests.log" >> "$OUT/summary.md"

timeout 200 "$PY" benchmarks/gpu_throughput.py "${BENCH_ARGS[@]}" --json "$OUT/gpu-bench.json" > "$OUT/gpu-bench.log" 2>&1
brc=$?
log "benchmark: exit $brc"
tail -n 4 "$OUT/gpu-bench.log" >> "$OUT/summary.md"
log "done in $(( $(date +%s) - start )) s"
exit $(( rc != 0 || brc != 0 ))
