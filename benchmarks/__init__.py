"""Loss and step benchmarks of papo-kernels against its peers (see benchmarks/README.md).

    python -m benchmarks.loss     # the vocabulary kernels vs eager, compile, Liger, CCE, verl, floor
    python -m benchmarks.step     # one PAPO update step on a random-init Qwen2.5-VL
    bash benchmarks/gpu_session.sh STAGE   # tests | loss | step on a lent GPU (or --dry-run on CPU)
"""
