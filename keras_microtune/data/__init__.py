"""Data for keras_microtune: array adapters, data checks, bundled datasets.

- `arrays`: `as_arrays` and `load_npz`, which turn what users pass to
  `kmt.convert` / `kmt.evaluate` into float32 arrays (rejecting bad data).
- `checks`: `inspect`, `clean` and `DataReport` (NaN/Inf, constant channels,
  outliers).
- `datasets`: real datasets shipped inside installed packages
  (`load_digits_transfer`, `load_basic_motions`).
"""

from keras_microtune.data.arrays import as_arrays, load_npz
from keras_microtune.data.checks import (
    INF_FIXES,
    NAN_FIXES,
    DataReport,
    clean,
    inspect,
)
from keras_microtune.data.datasets import load_basic_motions, load_digits_transfer

__all__ = [
    "INF_FIXES",
    "NAN_FIXES",
    "DataReport",
    "as_arrays",
    "clean",
    "inspect",
    "load_basic_motions",
    "load_digits_transfer",
    "load_npz",
]
