#!/usr/bin/env bash
export FEDMERGE_AMAZON_DIR=/work/shared/datasets/amazon
cd /tmp/paperc
for s in 0 1 2; do
  src=/work/runs/r3hist/s0-1/seed-$s; [ $s = 2 ] && src=/work/runs/r3hist/s2/seed-2
  for v in paper cosine; do
    out=/tmp/paperc/$v/seed-$s; rm -rf $out; mkdir -p $out; cp -r $src/clients $out/
    [ -f $src/data_digests.json ] && cp $src/data_digests.json $out/
    if [ $v = paper ]; then mr='merge.mergerec={preset = "paper"}'; else mr='merge.mergerec={preset = "paper", logit_norm = "cosine"}'; fi
    start=$(date +%s)
    fedmerge simulate /tmp/paperc/scenario.toml --engine inprocess --resume --out $out --set run.seed=$s \
      --set run.progress=false --set 'merge.methods=["mergerec_taskwise","mergerec_layerwise"]' --set "$mr" \
      --set baselines.individual=false --set baselines.theta0=false > /tmp/paperc/$v-$s.log 2>&1
    echo "$v seed $s rc=$? $(( $(date +%s) - start )) s" >> /tmp/paperc/progress.log
  done
done
echo done >> /tmp/paperc/progress.log
