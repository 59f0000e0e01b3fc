export FEDMERGE_AMAZON_DIR=/work/shared/datasets/amazon OMP_NUM_THREADS=1
for lr in 0.0005 0.0002 0.005; do
python benchmarks/dp_trainable.py --set model.params.n_negatives=256 --subsets all adapter-out biases-norms --no-private-reference --lr $lr
done
