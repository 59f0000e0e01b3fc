"""Thread-count independent numerics: gradient steps run on one intra-op thread.

Measured with torch 2.13 on the CPU (MKL 2024.2, OpenMP backend; ``tests/test_reproducibility.py``): the forward
passes this project runs (linear layers, attention, layer norm, softmax, cosine scores) give bit-identical outputs
with 1 and 2 threads for most batch sizes - not all: batches of 5-7 and 9-11 rows differ in the last bits (up to
2.9e-6 on the logits of a one-layer model; every size from 1 to 69 tried) - and several backward kernels do not -
layer norm's γ/β gradients, ``index`` backward (``index_put_`` with accumulation), softmax backward, full reductions ``x.sum()`` over more than ATen's grain size
(32,768 elements, split into one partial sum per thread) and MKL's GEMM for weight gradients (it splits the long
reduction dimension between threads). Their partial sums are combined in a thread-count dependent order, so the
weights after one epoch differed in the last bits and a model trained long enough differed in its metrics.

The fix is not a tolerance: every optimizer step (forward, backward, update) runs under :func:`gradient_threads`,
i.e. with exactly one intra-op thread, so its floating-point operation order is fixed, and so do θ₀ distillation's
tables; ``run.torch_threads`` and ``run.server_threads`` still parallelize the forward-only work (validation and
test scoring, MergeRec's teacher scores and item refreshes). Those are the same for the same thread count on any
machine - the defaults are 1 - but a batch of the sizes above can move a score's last bits between thread counts,
which can flip a tie in a ranking or an early-stopping epoch; with 0 ("the process's CPUs") the count, and so
possibly a figure, follows the machine, and the run says so (:func:`machine_dependent_thread_warnings`). Clients
run in parallel as separate processes under Flower, which keeps the cores busy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def process_cpus() -> int:
    """The CPUs this process is given: ``$OMP_NUM_THREADS`` when set to a positive integer (Ray sets it to a Flower
    simulation ClientApp's CPU share, ``client-resources-num-cpus``), else the size of its CPU affinity mask."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else len(os.sched_getaffinity(0))


def machine_dependent_thread_warnings(torch_threads: int, server_threads: int) -> list[str]:
    """A results.json warning for each of ``run.torch_threads`` / ``run.server_threads`` left at 0 (the CPUs the
    process is given): the forward passes then run at a machine-dependent thread count."""
    return [f"run.{key} = 0 ran forward passes at this machine's {process_cpus()} CPUs: a few batch sizes give "
            "other last bits at another thread count, so a tie in a ranking or an early-stopping epoch may differ on "
            f"another machine; set run.{key} to a number to fix it"
            for key, value in (("torch_threads", torch_threads), ("server_threads", server_threads)) if value == 0]


def thread_count(wanted: int) -> int:
    """Torch intra-op threads for forward-only work: ``wanted``, or :func:`process_cpus` when 0."""
    return wanted if wanted > 0 else process_cpus()


@contextmanager
def blas_threads() -> Iterator[None]:
    """Run the block with one BLAS thread (numpy's OpenBLAS or MKL, through threadpoolctl): text-LAE's Gram products
    and eigendecompositions gave thread-count dependent last bits (W differed by up to 1e-14 between
    ``OMP_NUM_THREADS`` 1 and 2). Usable as a decorator."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@contextmanager
def gradient_threads() -> Iterator[None]:
    """Run the block with one torch intra-op thread, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
