#!/bin/sh
# Usage: check_mpi.sh MPI_TRAIN IMML_TRAIN CKPT_COMPARE DATA_DIR WORK_DIR
#
# Data-parallel training equals single-process training.  On mfeat fac + mor
# (1000 training rows, 2 epochs, a fixed seeded order), imml-train (one
# process, the whole global batch) is the reference, and mpi-train runs with
# 1, 2, 3 and 4 ranks (--oversubscribe, shared memory on this host only):
#
#   - 1 rank: bit-identical to imml-train (TOL 0);
#   - global batch 64: 2 ranks (32 + 32 rows, last batch 20 + 20), 4 ranks
#     (16 each, last 10 each) and 3 ranks (unequal shards 22 + 21 + 21, last
#     batch 14 + 13 + 13): every parameter tensor within TOL_RANKS of the
#     reference (norm-wise relative error), same predominant modality,
#     warm-up count and dictionary fill;
#   - p given (the first step attends over the gathered global batch),
#     strict slots, global batch 50 on 4 ranks (13 + 13 + 12 + 12): the same
#     against imml-train with the same options;
#   - the checkpoints, read by imml-train --predict, predict the same classes
#     on the test split;
#   - --dump-params writes every parameter (awk recomputes the error).
#   - --precision bf16: 1 rank equals imml-train --precision bf16 bit for
#     bit, and differs from fp32 (or both fall back to fp32 and warn).
#
# TOL_RANKS.  A rank sums its own rows and MPI adds the R partial sums: the
# same float32 terms in another order, ~1e-7 relative per gradient (up to a
# few 1e-6 where a sum cancels, see tests/test_distributed.c).  32 AdamW
# steps carry these differences along: Adam's update lr * m / sqrt(v) turns
# the relative error of a gradient entry into an absolute one of lr times it,
# larger for the entries whose gradient is near zero and cancels.  Observed
# on this machine: at most 1.2e-6 (the errors are printed); TOL_RANKS = 1e-4
# leaves room for other BLAS kernels and thread counts, while a wrong scale
# (R, B_r/G), a shard taken twice or a missing allreduce gives errors of 1e-2
# and more.
#
# Exit 77 (skip) when mpirun is not installed.
set -eu
mpi_train=$1
imml_train=$2
compare=$3
data=$4
work=$5
TOL_RANKS=1e-4

mpirun=$(command -v mpirun || command -v mpiexec || true)
if [ -z "$mpirun" ]; then
  echo "SKIP: mpirun not found (install openmpi-bin)"
  exit 77
fi
# CI runs as root; Open MPI refuses that unless told.  Loopback only:
# shared memory between the ranks of this host, no network interfaces.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl=self,vader
export OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_mpi_yield_when_idle=1
export OMPI_MCA_rmaps_base_oversubscribe=1
# Under AddressSanitizer (the CI's second build): Open MPI keeps memory until
# exit.  Keep its plug-ins loaded and unwind fully so that the suppressions
# (lsan.supp, by library) recognise its allocations.
export OMPI_MCA_mca_base_component_disable_dlclose=1
supp=$(dirname "$0")/lsan.supp
export LSAN_OPTIONS="suppressions=$supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}fast_unwind_on_malloc=0"

rm -rf "$work"
mkdir -p "$work/split"
fac=$data/mfeat-fac.csv
mor=$data/mfeat-mor.csv
common="--quiet --threads 1 --epochs 2 --seed 3 --warmup 5 --gamma1 0.5"
# imml-train's own choices that mpi-train does not make (a validation split,
# the held-out choice of p, early stopping) are turned off for the reference
ref_only="--val-fraction 0 --choose-p library"

run_ranks() { # ranks name options...
  n=$1
  name=$2
  shift 2
  echo "== mpi-train, $n rank(s): $*"
  # shellcheck disable=SC2086
  "$mpirun" --oversubscribe --bind-to none -np "$n" "$mpi_train" $common \
    "$@" --save "$work/$name.ckpt" --dump-params "$work/$name.txt" \
    "$fac" "$mor" </dev/null >"$work/$name.out"
  cat "$work/$name.out"
}

echo "== imml-train (one process): --batch 64"
# shellcheck disable=SC2086
"$imml_train" $common $ref_only --batch 64 --save "$work/ref.ckpt" \
  --write-split "$work/split" "$fac" "$mor"
# shellcheck disable=SC2086
"$imml_train" $common --val-fraction 0 --batch 50 --predominant 0 \
  --slot-mode strict \
  --save "$work/ref-p0.ckpt" "$fac" "$mor" >/dev/null

run_ranks 1 r1 --batch 64
run_ranks 2 r2 --batch 64
run_ranks 3 r3 --batch 64
run_ranks 4 r4 --batch 64
run_ranks 4 r4-p0 --batch 50 --predominant 0 --slot-mode strict

echo "== parameters: 1 rank is imml-train bit for bit"
"$compare" 0 "$work/ref.ckpt" "$work/r1.ckpt"
echo "== parameters: 2, 3, 4 ranks within $TOL_RANKS of one process"
"$compare" "$TOL_RANKS" "$work/ref.ckpt" "$work/r2.ckpt" "$work/r3.ckpt" \
  "$work/r4.ckpt"
"$compare" "$TOL_RANKS" "$work/ref-p0.ckpt" "$work/r4-p0.ckpt"

echo "== --dump-params: norm-wise relative error of all parameters, 4 vs 1"
awk -v tol="$TOL_RANKS" '
  FNR == NR { ref[$1] = $3; n++; next }
  { d = $3 - ref[$1]; num += d * d; den += ref[$1] * ref[$1]; m++ }
  END {
    rel = sqrt(num) / (den > 0 ? sqrt(den) : 1)
    printf "%d parameters, relative error %.3g\n", m, rel
    if (m != n || m == 0 || !(rel <= tol)) exit 1
  }' "$work/r1.txt" "$work/r4.txt"

echo "== predictions of the saved checkpoints on the test split"
for name in ref r1 r2 r3 r4; do
  "$imml_train" --quiet --predict "$work/$name.ckpt" \
    --out "$work/$name.pred.csv" \
    "$work/split/mfeat-fac.test.csv" "$work/split/mfeat-mor.test.csv"
  cut -d, -f1,2 "$work/$name.pred.csv" >"$work/$name.classes"
done
for name in r1 r2 r3 r4; do
  if ! cmp -s "$work/ref.classes" "$work/$name.classes"; then
    echo "FAIL: $name predicts other classes than the single process:" >&2
    diff "$work/ref.classes" "$work/$name.classes" | head -n 10 >&2
    exit 1
  fi
done
rows=$(($(wc -l <"$work/ref.classes") - 1))
echo "all checkpoints predict the same classes on $rows test rows"

echo "== a bad --predominant names the valid indices"
rc=0
"$mpirun" -np 1 "$mpi_train" --predominant 5 "$fac" "$mor" </dev/null \
  >/dev/null 2>"$work/bad-p.err" || rc=$?
if [ "$rc" -ne 2 ] ||
  ! grep -q "^mpi-train: error: --predominant 5: modality indices are 0..1$" \
    "$work/bad-p.err"; then
  echo "FAIL: --predominant 5 with two modalities: exit $rc" >&2
  cat "$work/bad-p.err" >&2
  exit 1
fi
echo "exit 2: $(head -n 1 "$work/bad-p.err")"

echo "== --precision bf16: 1 rank is imml-train --precision bf16 bit for bit"
# imml-train and mpi-train both fall back to fp32, with a warning, where the
# build or the CPU has no bf16 products; then both equal the fp32 reference.
# shellcheck disable=SC2086
"$imml_train" $common $ref_only --batch 64 --precision bf16 \
  --save "$work/ref-bf16.ckpt" "$fac" "$mor" 2>"$work/ref-bf16.err" >/dev/null
# shellcheck disable=SC2086
"$mpirun" --oversubscribe --bind-to none -np 1 "$mpi_train" $common \
  --batch 64 --precision bf16 --save "$work/r1-bf16.ckpt" "$fac" "$mor" \
  </dev/null >/dev/null 2>"$work/r1-bf16.err"
"$compare" 0 "$work/ref-bf16.ckpt" "$work/r1-bf16.ckpt"
if grep -q "bf16 is unavailable" "$work/ref-bf16.err"; then
  grep -q "^mpi-train: warning: --precision bf16 is unavailable" \
    "$work/r1-bf16.err" || {
    echo "FAIL: mpi-train fell back to fp32 without a warning" >&2
    exit 1
  }
  "$compare" 0 "$work/ref.ckpt" "$work/r1-bf16.ckpt"
  echo "bf16 unavailable here: both trained in fp32 and warned"
elif "$compare" 0 "$work/ref.ckpt" "$work/r1-bf16.ckpt" >/dev/null 2>&1; then
  echo "FAIL: mpi-train --precision bf16 trained exactly as fp32" >&2
  exit 1
else
  echo "bf16 products used (the parameters differ from fp32's)"
fi
