"""Datasets (images as numpy arrays, text as strings), and deterministic batches."""

from genflax.data.batches import Batches
from genflax.data.catalogue import DatasetInfo
from genflax.data.catalogue import DatasetNotPreparedError
from genflax.data.catalogue import load
from genflax.data.feed import Feed
from genflax.data.text import load_text

__all__ = ["Batches", "DatasetInfo", "DatasetNotPreparedError", "Feed", "load", "load_text"]
