export FEDMERGE_AMAZON_DIR=/work/shared/datasets/amazon OMP_NUM_THREADS=1
python benchmarks/dp_trainable.py --set model.params.n_negatives=256 --subsets all --epsilon inf --dp-epochs 4 --sample-rate 0.02
