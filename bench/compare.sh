#!/bin/sh
# Runs libimml's benchmark and its PyTorch twin side by side, in one run, at
# 1 and 2 threads, with the environment as it is and with OPENBLAS_CORETYPE
# and OPENBLAS_L2_SIZE unset for that command alone, in float32 and in bf16
# (libimml's bf16 precision; PyTorch's forward under torch.autocast with
# bfloat16), and prints one table: per shape, threads and environment the
# four step times, the ratio of libimml's best to PyTorch's best, and for
# each libimml precision the share of its step inside the matrix products,
# their rate, and the ceiling measured in the same process (cblas_sgemm in
# float32; the library's bf16 kernel, and oneDNN's bf16 matmul when the
# benchmark was built with it, in bf16).
# The machine is shared and noisy: each configuration runs ROUNDS times
# (default 3), the four programs alternating, and every column is the
# median over the rounds of the per-round medians, so a burst of load
# during one program's run does not decide a ratio.  Every PyTorch run has
# its threads pinned by OMP_NUM_THREADS and OPENBLAS_NUM_THREADS (Debian's
# torch takes its float32 products from OpenBLAS, whose own threads
# torch.set_num_threads does not reach).
# usage: sh bench/compare.sh [--csv] [REPS [ROUNDS]]   (needs python3-torch)
# --csv prints only "impl,precision,shape,threads,env,train_ms" rows, one
# per measurement (impl libimml or pytorch, precision fp32 or bf16, env
# as-is or unset; train_ms the median).
set -eu
cd "$(dirname "$0")/.."
csv=0
if [ "${1:-}" = "--csv" ]; then
  csv=1
  shift
fi
reps=${1:-30}
rounds=${2:-3}
build="build-bench"
if [ ! -d "$build" ]; then
  meson setup "$build" --buildtype=release -Dtests=false >/dev/null
fi
ninja -C "$build" bench/imml-bench >/dev/null
bench="$build/bench/imml-bench"
py=/usr/bin/python3
have_torch=1
"$py" -c 'import torch' 2>/dev/null || have_torch=0
[ "$have_torch" = 1 ] || echo "# python3-torch not found: no PyTorch rows (apt-get install python3-torch)" >&2
have_bf16=1
if ! why=$("$bench" --precision bf16 --shape small --reps 1 2>&1 >/dev/null); then
  have_bf16=0
  echo "# no libimml bf16 rows: ${why#bench: }" >&2
fi

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
# $tmp/all.csv: impl,precision,shape,threads,env,train_ms,infer_ms, then
# for libimml: share,rate,ceiling,core,in_rate,ref_ceiling
: >"$tmp/all.csv"
for env in as-is unset; do
  for t in 1 2; do
    if [ "$env" = unset ]; then
      run() { env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS="$t" OMP_NUM_THREADS="$t" "$@"; }
    else
      run() { env OPENBLAS_NUM_THREADS="$t" OMP_NUM_THREADS="$t" "$@"; }
    fi
    for f in lf lb tf tb; do : >"$tmp/$f.all"; done
    r=0
    while [ "$r" -lt "$rounds" ]; do
      run "$bench" --csv --threads "$t" --reps "$reps" --precision fp32 >>"$tmp/lf.all"
      [ "$have_bf16" = 1 ] && run "$bench" --csv --threads "$t" --reps "$reps" --precision bf16 >>"$tmp/lb.all"
      [ "$have_torch" = 1 ] && run "$py" bench/torch_reference.py --threads "$t" --reps "$reps" --precision fp32 >>"$tmp/tf.all"
      [ "$have_torch" = 1 ] && run "$py" bench/torch_reference.py --threads "$t" --reps "$reps" --precision bf16 >>"$tmp/tb.all"
      r=$((r + 1))
    done
    for f in lf lb tf tb; do
      case $f in
        lf) impl=libimml prec=fp32 ;;
        lb) impl=libimml prec=bf16 ;;
        tf) impl=pytorch prec=fp32 ;;
        tb) impl=pytorch prec=bf16 ;;
      esac
      # bench: shape,threads,train,infer,share,rate,ceiling,core,prec,in_rate,ref
      # torch: shape,threads,train,infer,core,prec
      median_rows "$tmp/$f.all" | awk -F, -v OFS=, -v i="$impl" -v p="$prec" -v e="$env" '
        i == "libimml" { print i, p, $1, $2, e, $3, $4, $5, $6, $7, $8, $10, $11; next }
        { print i, p, $1, $2, e, $3, $4 }' >>"$tmp/all.csv"
    done
  done
done

if [ "$csv" = 1 ]; then
  echo "impl,precision,shape,threads,env,train_ms"
  awk -F, -v OFS=, '{ print $1, $2, $3, $4, $5, $6 }' "$tmp/all.csv"
  exit 0
fi

echo "# OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-(unset)} OPENBLAS_L2_SIZE=${OPENBLAS_L2_SIZE:-(unset)}; $(nproc) cores; $reps repetitions, medians; median of $rounds alternating rounds"
echo "# step ms: libimml fp32 and bf16, PyTorch fp32 and bf16 autocast; ratio: libimml's best / PyTorch's best of the row;"
echo "# then per libimml precision: % of its step inside the matrix products, their GFLOP/s there, and the ceiling"
echo "# measured in the same process (fp32: cblas_sgemm; bf16: the library's kernel, and oneDNN's bf16 matmul)"
awk -F, '
  { key = $3 SUBSEP $4 SUBSEP $5; t[key, $1, $2] = $6
    if (!(key in seen)) { seen[key] = 1; order[++n] = key }
    if ($1 == "libimml") { share[key, $2] = $8; in_rate[key, $2] = $12
                           ceil[key, $2] = $10; ref[key, $2] = $13 } }
  function ms(x) { return x == "" ? "-" : sprintf("%.2f", x) }
  function pc(x) { return x == "" ? "-" : sprintf("%.0f%%", 100 * x) }
  function gf(x) { return x == "" || x + 0 == 0 ? "-" : sprintf("%.0f", x) }
  function best(a, b) { return a == "" ? b : (b == "" || a + 0 < b + 0 ? a : b) }
  END {
    printf "%-16s %3s %-6s %8s %8s %8s %8s %5s | %4s %5s %5s | %4s %5s %5s %5s\n",
      "shape", "thr", "env", "imml32", "imml16", "torch32", "torch16", "ratio",
      "in", "rate", "sgemm", "in", "rate", "kern", "dnnl"
    for (q = 1; q <= n; q++) {
      key = order[q]; split(key, f, SUBSEP)
      li = best(t[key, "libimml", "fp32"], t[key, "libimml", "bf16"])
      pt = best(t[key, "pytorch", "fp32"], t[key, "pytorch", "bf16"])
      ratio = (li != "" && pt != "") ? sprintf("%.2f", li / pt) : "-"
      printf "%-16s %3s %-6s %8s %8s %8s %8s %5s | %4s %5s %5s | %4s %5s %5s %5s\n",
        f[1], f[2], f[3],
        ms(t[key, "libimml", "fp32"]), ms(t[key, "libimml", "bf16"]),
        ms(t[key, "pytorch", "fp32"]), ms(t[key, "pytorch", "bf16"]), ratio,
        pc(share[key, "fp32"]), gf(in_rate[key, "fp32"]), gf(ceil[key, "fp32"]),
        pc(share[key, "bf16"]), gf(in_rate[key, "bf16"]), gf(ceil[key, "bf16"]),
        gf(ref[key, "bf16"])
    }
  }' "$tmp/all.csv"
echo "# the goal: per shape and environment, libimml's best step (either thread count, either precision)"
echo "# over PyTorch's best (either thread count, fp32 or bf16 autocast):"
awk -F, '
  { k = $3 SUBSEP $5
    if (!(k in seen)) { seen[k] = 1; order[++n] = k }
    if ($1 == "libimml" && (!(k in li) || $6 + 0 < li[k])) { li[k] = $6 + 0; lw[k] = $2 " " $4 "t" }
    if ($1 == "pytorch" && (!(k in pt) || $6 + 0 < pt[k])) { pt[k] = $6 + 0; pw[k] = $2 " " $4 "t" } }
  END {
    for (q = 1; q <= n; q++) {
      k = order[q]; split(k, f, SUBSEP)
      if (!(k in li) || !(k in pt)) continue
      printf "#   %-16s %-6s libimml %8.2f ms (%s)  PyTorch %8.2f ms (%s)  ratio %.2f\n",
        f[1], f[2], li[k], lw[k], pt[k], pw[k], li[k] / pt[k]
    }
  }' "$tmp/all.csv"
echo "# inference (ms), last configuration (2 threads, unset): libimml fp32, bf16; PyTorch fp32, bf16"
awk -F, '$4 == 2 && $5 == "unset" { k = $3; if (!(k in s)) { s[k] = 1; o[++n] = k } v[k, $1, $2] = $7 }
  END { for (q = 1; q <= n; q++) { k = o[q]
    printf "#   %-16s %8s %8s %8s %8s\n", k, v[k, "libimml", "fp32"], v[k, "libimml", "bf16"],
      v[k, "pytorch", "fp32"], v[k, "pytorch", "bf16"] } }' "$tmp/all.csv"
echo "# peak memory, paper shape:"
"$bench" --shape paper --reps 5 --rss | sed -n 's/^/#   /p' | head -1
