#!/bin/sh
# The README's main job: installs what is missing, builds libimml and
# imml-train, and runs the comparison on the shipped mfeat data
# (fac = profile correlations, predominant; mor = morphology, auxiliary).
# usage: sh examples/demo.sh [extra imml-train flags...]
set -eu
cd "$(dirname "$0")/.."
sh .ci/install-deps
build=build-demo
if [ ! -d "$build" ]; then
  meson setup "$build" --buildtype=release -Dtests=false >/dev/null
fi
ninja -C "$build" examples/imml-train/imml-train >/dev/null
exec "$build/examples/imml-train/imml-train" --demo "$@"
