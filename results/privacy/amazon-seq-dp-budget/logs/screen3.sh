export FEDMERGE_AMAZON_DIR=/work/shared/datasets/amazon OMP_NUM_THREADS=1
B="python benchmarks/dp_trainable.py --set model.params.n_negatives=256 --no-private-reference --subsets all"
$B --epsilon inf
$B --epsilon inf --lr 0.01
$B --epsilon inf --sample-rate 0.005
$B --epsilon 8 --lr 0.01
$B --epsilon 8 --sample-rate 0.005
