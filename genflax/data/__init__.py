"""Datasets as numpy arrays, and deterministic batches of them."""

from genflax.data.batches import Batches
from genflax.data.catalogue import DatasetInfo
from genflax.data.catalogue import DatasetNotPreparedError
from genflax.data.catalogue import load

__all__ = ["Batches", "DatasetInfo", "DatasetNotPreparedError", "load"]
