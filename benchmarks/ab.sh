#!/usr/bin/env bash
# Kernel variants side by side in one device call: AB="main idea idea+other" bash benchmarks/device.sh ab
# A variant is `main` (exlcore/ as it is) or patches benchmarks/variants/NAME.patch joined by +, applied in that order
# to a copy of exlcore/ under .build/ab (git diff output, led by a few lines on what it tries and why). All are built
# at once; then each one's batch-1 decode tok/s (benchmarks/decode.py, AB_ROUNDS rounds, default 4), taking turns,
# twice over; then each one's kernel table (benchmarks/kernels.py); and with AB_TESTS set (a pytest -k expression),
# each patched variant's CUDA tests that match it. Three variants take about 3 minutes on an H100 machine.
# With AB_SCRIPT set ("benchmarks/x.py ARGS"), each variant runs that script instead, under AB_PROFILE if set (a
# profiler's command line, e.g. ncu with its options): probes such as benchmarks/timeline.py.
set -uo pipefail
root=$PWD/.build/ab
variants=(${AB:?set AB to the variants to compare, e.g. AB=\"main idea\"})
py() {  # py VARIANT ARGS...: python with that variant's exlcore and build folder (-P: not the one in the tree)
  local v=$1; shift
  EXLCORE_BUILD_DIR=$root/$v.build PYTHONPATH=$root/$v:$PWD/benchmarks ${AB_PROFILE:-} python3 -P "$@"
}
pids=()
for v in "${variants[@]}"; do
  rm -rf "$root/$v" && mkdir -p "$root/$v" && cp -r exlcore "$root/$v/"
  if [ "$v" != main ]; then
    for p in ${v//+/ }; do
      git apply --directory=".build/ab/$v" "benchmarks/variants/$p.patch" \
        || { echo "ab: benchmarks/variants/$p.patch does not apply to exlcore/ as it is: rebase it on main"; exit 1; }
    done
  fi
  py "$v" -c "from exlcore.ext import extension; assert extension() is not None" >"$OUT/build_$v.log" 2>&1 &
  pids+=($!)
done
[ -n "${AB_SCRIPT:-}" ] || python3 benchmarks/decode.py "$HOME/bench" 0  # the model, written while they build
for i in "${!variants[@]}"; do
  wait "${pids[$i]}" || { echo "ab: variant ${variants[$i]} does not build:"; tail -20 "$OUT/build_${variants[$i]}.log"; exit 1; }
done
if [ -n "${AB_SCRIPT:-}" ]; then
  for v in "${variants[@]}"; do echo "== $v"; py "$v" $AB_SCRIPT 2>&1 | tail -40; done
  exit 0
fi
for turn in 1 2; do
  for v in "${variants[@]}"; do py "$v" benchmarks/decode.py "$HOME/bench" "${AB_ROUNDS:-4}" "$v" 2>&1 | tail -1; done
done
for v in "${variants[@]}"; do echo "== $v"; py "$v" benchmarks/kernels.py 2>&1 | tail -24; done
if [ -n "${AB_TESTS:-}" ]; then
  for v in "${variants[@]}"; do
    [ "$v" = main ] || { echo "== tests $v"; py "$v" -m pytest -q -m cuda tests -k "$AB_TESTS" 2>&1 | tail -4; }
  done
fi
