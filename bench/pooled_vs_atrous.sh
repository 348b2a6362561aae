#!/bin/bash
# Pooled against a-trous 3D models on a finished demo work dir (issue 14 item 5): trains 2D-3D A (model-1 features) and the
# standard model with design=pooled from the demo's own configs (52³ / 60³ patches), segments the demo's test phantoms,
# evaluates them and runs the paired tests against the demo's evaluation CSVs.  Usage: bench/pooled_vs_atrous.sh W OUT
set -e
cd "$(dirname "$0")/.."
D=${1:?usage: bench/pooled_vs_atrous.sh DEMO_WORKDIR OUT_DIR}; O=${2:?usage: bench/pooled_vs_atrous.sh DEMO_WORKDIR OUT_DIR}; P=.venv/bin/python; mkdir -p $O
mkdir -p $O/test_cases
for c in $(python3 -c "import json; print(' '.join(json.load(open('$D/split.json'))['test']))"); do ln -sfn $D/data/phantoms/$c $O/test_cases/$c; done
M1=$D/models/2d_model1_axial,$D/models/2d_model1_coronal,$D/models/2d_model1_sagittal
for spec in "3d_A_model1 52" "3d_standard 60"; do
  set -- $spec; name=$1; size=$2
  [ -f $O/$name/model.keras ] || $P -m bench.train_pooled_like $D/models/$name $O/$name $size > $O/$name.log 2>&1
  tail -1 $O/$name.log
  models=$O/$name; [ $name = 3d_A_model1 ] && models=$O/$name,$M1
  rm -rf $O/pred_$name; $P -m brats_tf.segment --case_dir $O/test_cases --models $models --out_dir $O/pred_$name > /dev/null
  $P -m brats_tf.evaluate --pred_dir $O/pred_$name --ref_dir $O/test_cases --metrics legacy --out $O/$name.csv > /dev/null
  echo "== $name: a-trous (baseline) vs pooled (candidate)"
  $P -m brats_tf.compare --baseline $D/demo/evaluation/$name.csv --candidate $O/$name.csv
done
