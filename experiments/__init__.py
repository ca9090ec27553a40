"""Experiments on the bundled task: does PAPO help, and does the exact estimator?

`python -m experiments.sweep` trains every variant of `experiments.variants` over seeds through
the trainer (`train/`), `python -m experiments.report` turns the runs into tables and curves,
`python -m experiments.grad_noise` measures the gradient noise of the two perception-KL
estimators. See experiments/README.md for the design and the statistics.
"""
