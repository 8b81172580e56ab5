"""Tools beside the training stack: selection plots, kernel counts, small on-disk data sets.

Nothing here is needed to train: :mod:`flexact.tools.plot` redraws selection histories
(``flexact plot``), :mod:`flexact.tools.profiling` counts kernels for the benchmarks, and
:mod:`flexact.tools.fake_data` writes tiny MNIST/CIFAR-10/movie-review files in their genuine
formats (tests, benchmarks and offline trials of the configs).
"""
