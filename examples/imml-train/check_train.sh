#!/bin/sh
# Usage: check_train.sh IMML_TRAIN DATA_DIR WORK_DIR
# A short real training run on two mfeat views (fac + fou, 5 epochs, no
# early stopping): the program must succeed, write one metrics row per
# epoch, and reach a test accuracy far above chance (0.1 for the ten
# digits).
set -eu
exe=$1
data=$2
work=$3
mkdir -p "$work"
metrics=$work/train-metrics.csv
rm -f "$metrics"
"$exe" --quiet --epochs 5 --patience 0 --min-test-acc 0.85 --metrics "$metrics" \
  "$data/mfeat-fac.csv" "$data/mfeat-fou.csv"
header=$(head -n 1 "$metrics")
if [ "$header" != "epoch,loss,ce,con,dis,train_acc,test_acc,seconds,val_acc" ]; then
  echo "FAIL: unexpected metrics header: $header" >&2
  exit 1
fi
rows=$(($(wc -l <"$metrics") - 1))
if [ "$rows" -ne 5 ]; then
  echo "FAIL: $rows metrics rows, expected 5" >&2
  exit 1
fi
# The loss must fall and the final test accuracy must clear 0.85.
awk -F, 'NR == 2 { first = $2 }
         NR > 1 { last = $2; acc = $7 }
         END {
           printf "first loss %s, last loss %s, test accuracy %s\n", first, last, acc
           if (!(last < first) || !(acc >= 0.85)) exit 1
         }' "$metrics"
