export FEDMERGE_AMAZON_DIR=/work/shared/datasets/amazon OMP_NUM_THREADS=1
while pgrep -f screen4.sh >/dev/null; do sleep 10; done
python benchmarks/dp_trainable.py --set model.params.n_negatives=256 --no-private-reference --subsets adapter --epsilon 8 --dp-epochs 10
python benchmarks/dp_trainable.py --set model.params.n_negatives=256 --no-private-reference --subsets all --epsilon inf --dp-epochs 10
