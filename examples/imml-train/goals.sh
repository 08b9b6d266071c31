#!/bin/sh
# Issue 16's goals, measured: `imml-train --compare N` on every mfeat pair
# of doc/RESULTS.md, on the six views together, and on stratified training
# subsamples of 10% and 25% of each, then one summary table with the four
# goals checked per row:
#   cond >= LF        IMML conditional at least plain late fusion
#   cond >= LFH-0.5   ... at least late fusion + heads minus 0.5 points
#   cond >= best-0.5  ... at least the best modality alone minus 0.5
#   p gap <= 2        on every seed, the chosen p's unimodal head within 2
#                     points of the best head
# usage: sh examples/imml-train/goals.sh IMML_TRAIN OUTDIR [SEEDS [THREADS]]
#   IMML_TRAIN  the imml-train binary (e.g. build-demo/examples/imml-train/
#               imml-train); OUTDIR receives one NAME.txt per run and
#               summary.md; SEEDS defaults to 10, THREADS (BLAS) to 1.
# Runs that already have a complete NAME.txt are not run again, so an
# interrupted measurement resumes.  GOALS_EXTRA adds options to every run
# (the test: GOALS_EXTRA="--epochs 2").
set -eu
if [ $# -lt 2 ]; then
  echo "usage: $0 IMML_TRAIN OUTDIR [SEEDS [THREADS]]" >&2
  exit 2
fi
bin=$1
out=$2
seeds=${3:-10}
threads=${4:-1}
data=$(dirname "$0")/../data/mfeat
mkdir -p "$out"
# The options every run of OUTDIR shares: a measurement resumes only with
# the same ones, so runs of different settings are never mixed.
stamp="seeds $seeds threads $threads extra ${GOALS_EXTRA:-}"
if [ -f "$out/options" ]; then
  if [ "$(cat "$out/options")" != "$stamp" ]; then
    echo "goals.sh: $out holds runs with other options ($(cat "$out/options")); use another OUTDIR" >&2
    exit 2
  fi
else
  echo "$stamp" >"$out/options"
fi

run() { # NAME SUBSAMPLE FILES...
  name=$1
  sub=$2
  shift 2
  if [ -f "$out/$name.txt" ]; then
    return
  fi
  echo "== $name" >&2
  # shellcheck disable=SC2086
  "$bin" --compare "$seeds" --threads "$threads" --train-subsample "$sub" \
    --quiet ${GOALS_EXTRA:-} "$@" >"$out/$name.txt.part"
  mv "$out/$name.txt.part" "$out/$name.txt"
}

pairs="fac+mor fac+fou pix+fou pix+mor kar+zer fac+zer kar+fou"
for sub in 1 0.25 0.1; do
  tag=
  [ "$sub" = 1 ] || tag=-$(awk "BEGIN{print $sub*100}")pct
  for pr in $pairs; do
    a=${pr%+*}
    b=${pr#*+}
    run "$a-$b$tag" "$sub" "$data/mfeat-$a.csv" "$data/mfeat-$b.csv"
  done
  run "six-views$tag" "$sub" "$data/mfeat-fac.csv" "$data/mfeat-fou.csv" \
    "$data/mfeat-kar.csv" "$data/mfeat-mor.csv" "$data/mfeat-pix.csv" \
    "$data/mfeat-zer.csv"
done

# The summary: one row per run, in the order above.
status=0
{
  echo "| run | IMML cond. | late fusion | LF + heads | best alone | OGM-GE | QMF | IMML strict | cond - LF | cond - LFH | cond - best | p gap, worst seed | goals met |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  for sub in 1 0.25 0.1; do
    tag=
    [ "$sub" = 1 ] || tag=-$(awk "BEGIN{print $sub*100}")pct
    for name in $(for pr in $pairs; do echo "${pr%+*}-${pr#*+}$tag"; done) six-views$tag; do
      awk -v name="$name" '
        function mean(s) { return s + 0 }
        /^unimodal \(/ || /^late fusion  / || /^late fusion \+ heads/ || /^OGM-GE/ || /^QMF/ || /^IMML conditional  / || /^IMML strict/ {
          line = $0
          sub(/^(unimodal \([^)]*\)|late fusion \+ heads|late fusion|OGM-GE|QMF|IMML conditional|IMML strict)[ ]+/, "", line)
          split(line, f, " ")
          key = $0
          if (key ~ /^late fusion \+ heads/) lfh = f[1]
          else if (key ~ /^late fusion/) lf = f[1]
          else if (key ~ /^OGM-GE/) ogm = f[1]
          else if (key ~ /^QMF/) qmf = f[1]
          else if (key ~ /^IMML conditional/) cond = f[1]
          else if (key ~ /^IMML strict/) strict = f[1]
        }
        /chosen p minus the best modality/ {
          match($0, /heads mean [-+0-9.]+, worst [-+0-9.]+/)
          s = substr($0, RSTART, RLENGTH); split(s, g, " "); pworst = g[5]
        }
        /^IMML conditional minus/ {
          n = split($0, g, " ")
          dlf = g[6]; sub(/,/, "", dlf)
          dlfh = g[11]; sub(/,/, "", dlfh)
          dbest = g[n - 1]
          best = cond - dbest
        }
        END {
          if (cond == "" || lf == "" || lfh == "" || ogm == "" || qmf == "" ||
              strict == "" || dlf == "" || dlfh == "" || dbest == "" || pworst == "") {
            printf "| %s | ? (an output line is missing or has another format) |\n", name
            exit 1
          }
          ok = 0; miss = ""
          if (dlf + 0 >= 0) ok++; else miss = miss " LF"
          if (dlfh + 0 >= -0.5) ok++; else miss = miss " LFH"
          if (dbest + 0 >= -0.5) ok++; else miss = miss " best"
          if (-pworst <= 2) ok++; else miss = miss " p"
          printf "| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %+.2f | %+.2f | %+.2f | %+.2f | %d/4%s |\n",
            name, cond, lf, lfh, best, ogm, qmf, strict, dlf, dlfh, dbest, pworst, ok,
            miss == "" ? "" : " (not:" miss ")"
        }' "$out/$name.txt" || status=1
    done
  done
} >"$out/summary.md"
cat "$out/summary.md"
exit "$status"
