"""Activation search on Optuna (docs/search.md): spaces, proposers, the objective."""
