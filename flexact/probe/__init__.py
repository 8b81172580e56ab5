"""Training-free probes of candidate activations (pure torch; no Lightning).

:mod:`flexact.probe.fisher` computes the features that predict how well a network with a given
activation will train (Bingham & Miikkulainen, 2023): the activation's outputs on a fixed
N(0, 1) sample, and the eigenvalue spectrum of the network's Fisher information at
initialization, from per-layer K-FAC blocks.
"""
