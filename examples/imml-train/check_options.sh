#!/bin/sh
# Usage: check_options.sh CASE IMML_TRAIN DATA_DIR TESTDATA_DIR WORK_DIR
# One check per option of imml-train's validation, warm-up, comparison,
# prediction, split, header and file-mode handling; each case fails with a
# "FAIL:" line when the program does not do what --help says.
set -eu
case=$1
exe=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
data=$3
testdata=$4
work=$5/$case
rm -rf "$work"
mkdir -p "$work"
fac=$data/mfeat-fac.csv
mor=$data/mfeat-mor.csv
fou=$data/mfeat-fou.csv

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# value KEY FILE: the text after "KEY " on the line of FILE that starts so.
value() {
  sed -n "s/^$1 //p" "$2" | head -n 1
}

case $case in
val-split)
  # 1000 training rows (100 per class): --val-fraction 0.3 carves 30 per
  # class; 0 carves none, and p is then the library's choice.
  "$exe" --quiet --epochs 1 --val-fraction 0.3 "$fac" "$mor" >"$work/a.out"
  cat "$work/a.out"
  [ "$(value rows: "$work/a.out")" = "700 fitting, 300 validation, 1000 test" ] ||
    fail "--val-fraction 0.3: wrong row counts"
  grep -q '^validation accuracy 0\.' "$work/a.out" ||
    fail "--val-fraction 0.3: no validation accuracy"
  "$exe" --quiet --epochs 1 --val-fraction 0 --warmup 5 "$fac" "$mor" \
    >"$work/b.out"
  cat "$work/b.out"
  [ "$(value rows: "$work/b.out")" = "1000 fitting, 0 validation, 1000 test" ] ||
    fail "--val-fraction 0: wrong row counts"
  ! grep -q '^validation accuracy' "$work/b.out" ||
    fail "--val-fraction 0 reports a validation accuracy"
  grep -q "^predominant modality .*the library's choice after 5 warm-up" \
    "$work/b.out" || fail "--val-fraction 0: p is not the library's choice"
  ;;
early-stop)
  # --patience 2: training stops 2 epochs after the best validation epoch,
  # whose model (and validation accuracy) is the one reported; no later
  # epoch has a higher validation accuracy.
  "$exe" --quiet --threads 1 --epochs 40 --patience 2 --train-subsample 0.5 \
    --lr 0.003 --metrics "$work/m.csv" "$fac" "$mor" >"$work/a.out"
  cat "$work/a.out"
  line=$(value "best epoch" "$work/a.out")
  best=${line%% of *}
  rest=${line#* of }
  ran=${rest%% *}
  echo "best epoch $best, epochs trained $ran"
  [ "$ran" -lt 40 ] || fail "no early stop in 40 epochs"
  [ "$ran" -eq $((best + 2)) ] || fail "stopped at $ran, best $best, patience 2"
  case $line in *"stopped early, best epoch restored"*) ;;
  *) fail "the report does not say the best epoch was restored" ;;
  esac
  rows=$(($(wc -l <"$work/m.csv") - 1))
  [ "$rows" -eq "$ran" ] || fail "$rows metrics rows for $ran epochs"
  want=$(awk -F, -v e="$best" 'NR > 1 && $1 == e { print $9 }' "$work/m.csv")
  [ "$(value "validation accuracy" "$work/a.out")" = "$want" ] ||
    fail "reported validation accuracy is not epoch $best's ($want)"
  awk -F, -v e="$best" 'NR > 1 && $1 == e { b = $9 }
    NR > 1 && $1 > e && $9 > b { bad = 1 }
    END { exit bad }' "$work/m.csv" ||
    fail "a later epoch has a higher validation accuracy than epoch $best"
  ;;
choose-p)
  # heldout: the head with the lowest validation cross-entropy (or, when
  # the validation rows cannot tell heads apart, the lowest cross-entropy on
  # every training row among them); an index and "library" as asked.
  # --choose-p 1 picks the weak view (mor), which the library would never
  # choose: the host's choice comes first.
  "$exe" --quiet --threads 1 --epochs 3 --warmup 10 "$fac" "$mor" >"$work/h.out"
  cat "$work/h.out"
  grep -q "^predominant modality [01] (mfeat-...), held-out choice after 10 warm-up steps$" \
    "$work/h.out" || fail "heldout: unexpected report"
  p=$(value "predominant modality" "$work/h.out" | cut -d' ' -f1)
  scores=$(sed -n 's/^validation cross-entropy (accuracy) of each unimodal head at the choice: //p' \
    "$work/h.out")
  tied=$(sed -n 's/^the validation rows could not tell [0-9]* heads apart; their cross-entropy on every training row: //p' \
    "$work/h.out")
  [ -z "$tied" ] || scores=$tied
  best=$(echo "$scores" | tr ' ' '\n' | grep '=' |
    awk -F= 'NR == 1 || $2 < b { b = $2; i = $1 } END { print i }')
  if [ -z "$best" ] || [ "$p" != "$best" ]; then
    fail "heldout chose $p, the best head is $best ($scores)"
  fi
  "$exe" --quiet --threads 1 --epochs 3 --warmup 10 --choose-p 1 "$fac" "$mor" \
    >"$work/i.out"
  cat "$work/i.out"
  grep -q "^predominant modality 1 (mfeat-mor), given by --choose-p after 10 warm-up steps$" \
    "$work/i.out" || fail "--choose-p 1 was not applied"
  "$exe" --quiet --threads 1 --epochs 3 --warmup 10 --choose-p library \
    "$fac" "$mor" >"$work/l.out"
  cat "$work/l.out"
  grep -q "^predominant modality 0 (mfeat-fac), the library's choice after 10 warm-up steps$" \
    "$work/l.out" || fail "--choose-p library: unexpected report"
  # A weak view that memorises: mor plus 400 noise columns, next to kar on
  # 100 training rows.  Its head fits the fitting rows fastest, so the
  # library's rule (training cross-entropy) takes it; the held-out choice
  # must take kar (82% alone, against 68% for mor).
  awk -F, 'BEGIN { srand(7); OFS = "," }
    { n = NF; lab = $n; $n = ""; line = substr($0, 1, length($0) - 1)
      for (j = 0; j < 400; j++)
        line = line "," (NR == 1 ? j + n - 1 : sprintf("%.4f", rand() * 2 - 1))
      print line, lab }' "$mor" >"$work/mornoise.csv"
  for s in 0 1 2; do
    "$exe" --quiet --threads 1 --epochs 12 --warmup 24 --patience 0 --train-subsample 0.1 \
      --seed $s "$data/mfeat-kar.csv" "$work/mornoise.csv" >"$work/n$s.out"
    grep "^predominant\|^validation cross" "$work/n$s.out"
    grep -q "^predominant modality 0 (mfeat-kar), held-out choice" "$work/n$s.out" ||
      fail "seed $s: the held-out choice took the memorising view"
    "$exe" --quiet --threads 1 --epochs 12 --warmup 24 --patience 0 --train-subsample 0.1 \
      --seed $s --choose-p library "$data/mfeat-kar.csv" "$work/mornoise.csv" \
      >"$work/l$s.out"
    grep -q "^predominant modality 1 (mornoise), the library's choice" "$work/l$s.out" ||
      fail "seed $s: the library's rule did not take the memorising view (the test lost its point)"
  done
  ;;
warmup-scale)
  # 20% of 1000 rows = 200 training rows, 160 fitting: 3 batches x 4 epochs
  # = 12 steps; the default 100 is scaled to 20% of them, 2 steps.  A given
  # --warmup is kept, with a warning.
  "$exe" --epochs 4 --train-subsample 0.2 "$fac" "$mor" >"$work/a.out" \
    2>"$work/a.err"
  cat "$work/a.err" "$work/a.out"
  grep -q "^imml-train: warm-up 2 steps (scaled from 100: the default warm-up would cover 833% of the 12 training steps; capped at 20%" \
    "$work/a.err" || fail "no scaling note"
  grep -q "after 2 warm-up steps$" "$work/a.out" || fail "p not fixed after 2 steps"
  "$exe" --epochs 4 --train-subsample 0.2 --warmup 6 "$fac" "$mor" \
    >"$work/b.out" 2>"$work/b.err"
  cat "$work/b.err" "$work/b.out"
  grep -q "^imml-train: --warmup 6 covers 50% of the 12 training steps$" \
    "$work/b.err" || fail "no warning for a long given warm-up"
  grep -q "after 6 warm-up steps$" "$work/b.out" || fail "a given --warmup was changed"
  ;;
compare)
  # --compare on a fixed --train/--test split, and with a training
  # subsample: every method, the peer baselines included, learns.
  "$exe" --write-split "$work" --seed 2 "$fac" "$fou" >/dev/null
  "$exe" --quiet --threads 1 --compare 1 --epochs 3 \
    --train "$work/mfeat-fac.train.csv,$work/mfeat-fou.train.csv" \
    --test "$work/mfeat-fac.test.csv,$work/mfeat-fou.test.csv" >"$work/a.out"
  cat "$work/a.out"
  grep -q "^rows per seed: 800 fitting, 200 validation, 1000 test (the --test files," \
    "$work/a.out" || fail "fixed split: wrong rows"
  for m in "unimodal (mfeat-fac.train)" "late fusion" "late fusion + heads" \
    OGM-GE QMF "IMML conditional" "IMML strict"; do
    acc=$(grep -F "$m  " "$work/a.out" | grep -v "^ " | head -n 1 | awk '{ for (i = 1; i <= NF; i++)
      if ($i ~ /^[0-9]+\.[0-9]+$/) { print $i; exit } }')
    [ -n "$acc" ] || fail "no row for $m"
    awk -v a="$acc" 'BEGIN { exit !(a >= 85) }' || fail "$m: $acc% after 3 epochs"
  done
  "$exe" --quiet --threads 1 --compare 1 --epochs 1 --train-subsample 0.25 \
    "$fac" "$mor" >"$work/b.out"
  grep "^rows per seed" "$work/b.out"
  grep -q "^rows per seed: 200 fitting, 50 validation, 1000 test (test fraction 0.50, training subsample 25%," \
    "$work/b.out" || fail "--train-subsample 0.25: wrong rows"
  if ! grep -q "^aux shuffled: " "$work/b.out" ||
    ! grep -q "^conditional: " "$work/b.out"; then
    fail "no legend under the table"
  fi
  ;;
predict)
  # --predict reports macro-F1 (recomputed here from the predictions) and,
  # with --aux-shuffled, the accuracy with every modality but p shuffled.
  "$exe" --quiet --threads 1 --epochs 3 --seed 1 --warmup 10 --save "$work/m.imml" \
    --write-split "$work" "$fac" "$mor" >/dev/null
  "$exe" --predict "$work/m.imml" --aux-shuffled --out "$work/pred.csv" \
    "$work/mfeat-fac.test.csv" "$work/mfeat-mor.test.csv" 2>"$work/p.err"
  cat "$work/p.err"
  f1=$(sed -n 's/^imml-train: accuracy [0-9.]* .*, macro-F1 \([0-9.]*\)$/\1/p' "$work/p.err")
  awk -F, 'NR > 1 { print $NF }' "$work/mfeat-fac.test.csv" >"$work/y.txt"
  awk -F, 'NR > 1 { print $2 }' "$work/pred.csv" >"$work/c.txt"
  want=$(paste -d, "$work/y.txt" "$work/c.txt" | awk -F, '
    { if ($1 == $2) tp[$1]++; else { fn[$1]++; fp[$2]++ }; seen[$1]; seen[$2] }
    END { for (k in seen) { d = 2 * tp[k] + fp[k] + fn[k]; if (d) { s += 2 * tp[k] / d; n++ } }
          printf "%.6f", s / n }')
  if [ -z "$f1" ] || [ "$f1" != "$want" ]; then
    fail "macro-F1 '$f1', recomputed $want"
  fi
  grep -q "^imml-train: accuracy with the auxiliary modalities shuffled 0\.[0-9]* (every modality but 0 (mfeat-fac.test) permuted, seed 0), macro-F1 0\." \
    "$work/p.err" || fail "no shuffled-auxiliary accuracy"
  clean=$(sed -n 's/^imml-train: accuracy \([0-9.]*\) (.*/\1/p' "$work/p.err")
  shuf=$(sed -n 's/^imml-train: accuracy with the auxiliary modalities shuffled \([0-9.]*\) .*/\1/p' \
    "$work/p.err")
  awk -v a="$clean" -v b="$shuf" 'BEGIN { exit !(b < a) }' ||
    fail "shuffling mor did not change the accuracy ($clean, $shuf)"
  "$exe" --predict "$work/m.imml" --aux-shuffled --predominant 1 --seed 4 \
    --out /dev/null "$work/mfeat-fac.test.csv" "$work/mfeat-mor.test.csv" \
    2>"$work/q.err"
  cat "$work/q.err"
  grep -q "(every modality but 1 (mfeat-mor.test) permuted, seed 4)" "$work/q.err" ||
    fail "--predominant 1 --aux-shuffled: not applied"
  ;;
write-split)
  # --write-split alone writes the split and trains nothing.
  "$exe" --write-split "$work" --val-fraction 0.1 "$fac" "$mor" >"$work/a.out" \
    2>"$work/a.err"
  cat "$work/a.out" "$work/a.err"
  grep -q "^wrote the split to $work: 1000 training rows (100 of them for validation), 1000 test rows; not training" \
    "$work/a.out" || fail "unexpected report"
  ! grep -q "accuracy" "$work/a.out" "$work/a.err" || fail "it trained"
  for v in fac mor; do
    for part in train test; do
      n=$(($(wc -l <"$work/mfeat-$v.$part.csv") - 1))
      [ "$n" -eq 1000 ] || fail "mfeat-$v.$part.csv has $n rows"
    done
  done
  ;;
header)
  # A first line of numbers that are not column indices is a sample (with a
  # warning); column indices are a header; --header yes|no decide.
  cd "$testdata"
  "$exe" --write-split "$work" --test-fraction 0.34 nohdr_a.csv nohdr_b.csv \
    >"$work/a.out" 2>"$work/a.err"
  cat "$work/a.err" "$work/a.out"
  grep -q "^imml-train: warning: nohdr_a.csv: no header row (line 1 is numbers, not column indices): read as the first sample" \
    "$work/a.err" || fail "no warning for nohdr_a.csv"
  grep -q "warning: nohdr_b.csv: no header row" "$work/a.err" ||
    fail "no warning for nohdr_b.csv"
  grep -q "^wrote the split to $work: 3 training rows (0 of them for validation), 3 test rows" \
    "$work/a.out" || fail "the first samples were not read"
  head -n 1 "$work/nohdr_a.train.csv" | grep -qx "0,1,2,label" ||
    fail "no header written for a file read without one"
  "$exe" --write-split "$work" --header yes --test-fraction 0.34 nohdr_a.csv \
    nohdr_b.csv >"$work/b.out" 2>"$work/b.err"
  ! grep -q warning "$work/b.err" || fail "--header yes still warns"
  grep -q "^wrote the split to $work: 3 training rows (0 of them for validation), 2 test rows" \
    "$work/b.out" || fail "--header yes: the first line was not a header"
  "$exe" --write-split "$work" --test-fraction 0.34 idxhdr_a.csv ok_b.csv \
    >"$work/c.out" 2>"$work/c.err"
  ! grep -q warning "$work/c.err" || fail "a header of column indices warns"
  grep -q "3 test rows" "$work/c.out" || fail "column indices were read as a sample"
  ;;
modes)
  # The model and its .stats sidecar follow the umask alike, also when the
  # sidecar existed with another mode.
  for u in 027 077; do
    : >"$work/m.imml.stats"
    chmod 644 "$work/m.imml.stats"
    (umask $u && "$exe" --quiet --epochs 1 --save "$work/m.imml" "$fac" "$mor" \
      >/dev/null)
    want=$(printf '%o' $((0666 & ~0$u)))
    for f in m.imml m.imml.stats; do
      got=$(stat -c %a "$work/$f")
      echo "umask $u: $f mode $got"
      [ "$got" = "$want" ] || fail "umask $u: $f has mode $got, expected $want"
    done
    rm -f "$work/m.imml" "$work/m.imml.stats"
  done
  ;;
*)
  fail "unknown case $case"
  ;;
esac
echo "ok: $case"
