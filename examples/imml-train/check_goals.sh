#!/bin/sh
# goals.sh, quickly: one seed, two epochs.  All 24 runs produce an output,
# the summary has one row per run with every column a number, and a run
# whose output is complete is not run again.
# usage: check_goals.sh IMML_TRAIN WORK_DIR
set -eu
bin=$1
work=$2
rm -rf "$work"
mkdir -p "$(dirname "$work")"
GOALS_EXTRA="--epochs 2" sh "$(dirname "$0")/goals.sh" "$bin" "$work" 1 1 \
  >"$work.summary" 2>"$work.log"
rows=$(grep -c '^| [a-z]' "$work.summary" || true)
[ "$rows" -eq 25 ] || { # the header row and 24 runs
  echo "FAIL: expected 24 runs in the summary, got $((rows - 1))" >&2
  cat "$work.summary" "$work.log" >&2
  exit 1
}
bad=$(awk -F'|' 'NR > 2 {
  for (i = 3; i <= 13; i++) if ($i !~ /^ *[-+]?[0-9]+\.[0-9][0-9] *$/) { print; next }
  if ($14 !~ /^ [0-4]\/4/) print }' "$work.summary")
[ -z "$bad" ] || {
  echo "FAIL: summary rows with a missing number:" >&2
  echo "$bad" >&2
  exit 1
}
n=0
for f in "$work"/*.txt; do [ -f "$f" ] && n=$((n + 1)); done
[ "$n" -eq 24 ] || {
  echo "FAIL: not 24 outputs in $work" >&2
  exit 1
}
# Another seed count into the same directory is refused, not mixed in.
if sh "$(dirname "$0")/goals.sh" /nonexistent "$work" 2 1 >/dev/null 2>&1; then
  echo "FAIL: goals.sh mixed 2-seed runs into a 1-seed measurement" >&2
  exit 1
fi
# Resuming: nothing is run again (the binary is not even started).
GOALS_EXTRA="--epochs 2" sh "$(dirname "$0")/goals.sh" /nonexistent "$work" 1 1 \
  >"$work.summary2" 2>&1
cmp -s "$work.summary" "$work.summary2" || {
  echo "FAIL: a resumed measurement ran again or changed its summary" >&2
  exit 1
}
# An output goals.sh cannot read gives "?" and a failure, not a made-up 0.
sed -i '/^IMML conditional minus/d' "$work/fac-mor.txt"
if GOALS_EXTRA="--epochs 2" sh "$(dirname "$0")/goals.sh" /nonexistent "$work" 1 1 \
  >"$work.summary3" 2>&1; then
  echo "FAIL: goals.sh accepted an output it could not read" >&2
  exit 1
fi
echo "ok: 24 runs, a complete summary, a resume that reruns nothing, other"
echo "    options refused, an unreadable output refused"
