#!/bin/sh
# Runs libimml's benchmark and its PyTorch twin side by side, in one run, at
# 1 and 2 threads, with the environment as it is and with OPENBLAS_CORETYPE
# and OPENBLAS_L2_SIZE unset for that command alone, and prints one table:
# shape, threads, env, libimml ms, PyTorch ms, ratio, libimml GFLOP/s, the
# cblas_sgemm ceiling measured in the same process, and the share of the
# libimml step spent inside sgemm.
# The machine is shared and noisy: each configuration runs ROUNDS times
# (default 3), libimml and PyTorch alternating, and every column is the
# median over the rounds of the per-round medians, so a burst of load
# during one program's run does not decide a ratio.
# usage: sh bench/compare.sh [REPS [ROUNDS]]   (needs python3-torch)
set -eu
cd "$(dirname "$0")/.."
reps=${1:-30}
rounds=${2:-3}
build="build-bench"
if [ ! -d "$build" ]; then
  meson setup "$build" --buildtype=release -Dtests=false >/dev/null
fi
ninja -C "$build" bench/imml-bench >/dev/null
py=/usr/bin/python3
have_torch=1
"$py" -c 'import torch' 2>/dev/null || have_torch=0
[ "$have_torch" = 1 ] || echo "# python3-torch not found: PyTorch columns are empty (apt-get install python3-torch)"

# median_rows FILE: one row per shape (first field), in order of first
# appearance; each numeric field the median over that shape's rows, text
# fields from its first row.
median_rows() {
  awk -F, -v OFS=, '
    !($1 in cnt) { order[++nk] = $1; nf[$1] = NF }
    { c = ++cnt[$1]; for (i = 1; i <= NF; i++) rows[$1, c, i] = $i }
    END {
      for (q = 1; q <= nk; q++) {
        key = order[q]; n = cnt[key]; out = key
        for (i = 2; i <= nf[key]; i++) {
          if (rows[key, 1, i] ~ /^[0-9.eE+-]+$/) {
            for (j = 1; j <= n; j++) a[j] = rows[key, j, i] + 0
            for (j = 2; j <= n; j++) {
              t = a[j]; k = j - 1
              while (k >= 1 && a[k] > t) { a[k + 1] = a[k]; k-- }
              a[k + 1] = t
            }
            v = n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
          } else v = rows[key, 1, i]
          out = out OFS v
        }
        print out
      }
    }' "$1"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
echo "# OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-(unset)} OPENBLAS_L2_SIZE=${OPENBLAS_L2_SIZE:-(unset)}; $(nproc) cores; $reps repetitions, medians; median of $rounds alternating rounds"
printf '%-16s %3s %-6s %10s %10s %6s %8s %8s %6s %s\n' shape thr env \
  "imml ms" "torch ms" ratio "GFLOP/s" ceiling sgemm% kernel
for env in as-is unset; do
  for t in 1 2; do
    if [ "$env" = unset ]; then
      run() { env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS="$t" OMP_NUM_THREADS="$t" "$@"; }
    else
      run() { env OPENBLAS_NUM_THREADS="$t" OMP_NUM_THREADS="$t" "$@"; }
    fi
    : >"$tmp/c.all"
    : >"$tmp/t.all"
    r=0
    while [ "$r" -lt "$rounds" ]; do
      run "$build/bench/imml-bench" --csv --threads "$t" --reps "$reps" >>"$tmp/c.all"
      [ "$have_torch" = 1 ] && run "$py" bench/torch_reference.py --threads "$t" --reps "$reps" >>"$tmp/t.all"
      r=$((r + 1))
    done
    median_rows "$tmp/c.all" >"$tmp/c.csv"
    median_rows "$tmp/t.all" >"$tmp/t.csv"
    while IFS=, read -r shape thr train _infer share rate ceil core; do
      tms=$(awk -F, -v s="$shape" '$1 == s {print $3}' "$tmp/t.csv")
      ratio=$(awk -v a="$train" -v b="${tms:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
      printf '%-16s %3s %-6s %10.2f %10s %6s %8.1f %8.1f %5.0f%% %s\n' "$shape" "$thr" "$env" \
        "$train" "${tms:--}" "$ratio" "$rate" "$ceil" \
        "$(awk -v x="$share" 'BEGIN { print 100 * x }')" "$core"
    done <"$tmp/c.csv"
  done
done
echo "# inference (ms), libimml vs PyTorch, last configuration:"
awk -F, 'NR == FNR { t[$1] = $4; next } { printf "#   %-16s %8.3f %8s\n", $1, $4, t[$1] }' "$tmp/t.csv" "$tmp/c.csv"
echo "# peak memory, paper shape:"
"$build/bench/imml-bench" --shape paper --reps 5 --rss | sed -n 's/^/#   /p' | head -1
