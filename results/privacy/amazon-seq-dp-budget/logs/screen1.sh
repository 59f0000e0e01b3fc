export FEDMERGE_AMAZON_DIR=/work/shared/datasets/amazon OMP_NUM_THREADS=1
python benchmarks/dp_trainable.py --set model.params.n_negatives=256 --subsets all adapter blocks adapter-out biases-norms last-block
