#!/bin/sh
# Usage: check_roundtrip.sh IMML_TRAIN DATA_DIR WORK_DIR
# --save then --predict: the loaded model (the best validation epoch's),
# applied to the raw test rows of the split (written with --write-split),
# must reproduce the test accuracy of the training run exactly; the
# prediction file must agree with it; the same rows without their label
# column must give the same predictions; and training from the written split
# files (--train/--test, the validation rows carved again from the training
# file) must give the same test accuracy as training with the built-in
# split.
set -eu
exe=$1
data=$2
work=$3
rm -rf "$work"
mkdir -p "$work"
fac=$data/mfeat-fac.csv
mor=$data/mfeat-mor.csv
"$exe" --quiet --epochs 4 --seed 3 --warmup 20 --write-split "$work" \
  --save "$work/model.imml" --metrics "$work/metrics.csv" "$fac" "$mor" \
  >"$work/train.out"
cat "$work/train.out"
test -s "$work/model.imml"
test -s "$work/model.imml.stats"
want=$(sed -n 's/^test accuracy \([0-9.]*\)$/\1/p' "$work/train.out")
echo "test accuracy of the training run: $want"
test -n "$want"

"$exe" --predict "$work/model.imml" --out "$work/pred.csv" \
  "$work/mfeat-fac.test.csv" "$work/mfeat-mor.test.csv" 2>"$work/pred.err"
cat "$work/pred.err"
got=$(sed -n 's/^imml-train: accuracy \([0-9.]*\) .*/\1/p' "$work/pred.err")
if [ "$got" != "$want" ]; then
  echo "FAIL: --predict accuracy '$got' differs from the test accuracy '$want'" >&2
  exit 1
fi

# Accuracy recomputed from the prediction file and the labels.
awk -F, 'NR > 1 { print $NF }' "$work/mfeat-fac.test.csv" >"$work/labels.txt"
awk -F, 'NR > 1 { print $2 }' "$work/pred.csv" >"$work/classes.txt"
fromfile=$(paste -d, "$work/labels.txt" "$work/classes.txt" |
  awk -F, '{ n++; ok += ($1 == $2) } END { printf "%.6f", ok / n }')
if [ "$fromfile" != "$want" ]; then
  echo "FAIL: accuracy from $work/pred.csv is $fromfile, expected $want" >&2
  exit 1
fi
cols=$(awk -F, 'NR == 2 { print NF }' "$work/pred.csv")
if [ "$cols" -ne 12 ]; then
  echo "FAIL: prediction rows have $cols fields, expected 12 (index, class, 10 probabilities)" >&2
  exit 1
fi

# The same rows without the label column.
for v in fac mor; do
  sed 's/,[^,]*$//' "$work/mfeat-$v.test.csv" >"$work/mfeat-$v.nolabel.csv"
done
"$exe" --predict "$work/model.imml" --quiet \
  "$work/mfeat-fac.nolabel.csv" "$work/mfeat-mor.nolabel.csv" >"$work/pred-nolabel.csv"
if ! cmp "$work/pred.csv" "$work/pred-nolabel.csv"; then
  echo "FAIL: predictions without the label column differ" >&2
  exit 1
fi

# Training from the written split files reproduces the built-in split.
"$exe" --quiet --epochs 4 --seed 3 --warmup 20 \
  --train "$work/mfeat-fac.train.csv,$work/mfeat-mor.train.csv" \
  --test "$work/mfeat-fac.test.csv,$work/mfeat-mor.test.csv" >"$work/again.out"
again=$(sed -n 's/^test accuracy \([0-9.]*\)$/\1/p' "$work/again.out")
if [ "$again" != "$want" ]; then
  echo "FAIL: --train/--test on the written split gave $again, expected $want" >&2
  exit 1
fi
echo "ok: --predict reproduces test accuracy $want"
