"""Lightning data modules."""

from flexact.datamodules.synthetic import SyntheticDataModule, make_synthetic

__all__ = ["SyntheticDataModule", "make_synthetic"]
