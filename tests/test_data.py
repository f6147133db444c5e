"""Representative-data adapters: every accepted form, every rejected one."""

import os
import pickle

import numpy as np
import pytest
import tensorflow as tf

from keras_microtune import data

SHAPES = [(4, 3)]


def _x(n=5):
    return np.arange(n * 12, dtype="float32").reshape(n, 4, 3)


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y: x,
        lambda x, y: (x, y),
        lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(2),
        lambda x, y: tf.data.Dataset.from_tensor_slices(x),
        lambda x, y: (s for s in x),
        lambda x, y: ((x[i : i + 1], y[i : i + 1]) for i in range(len(x))),
    ],
    ids=["array", "tuple", "dataset-batched", "dataset-samples", "gen", "gen-xy"],
)
def test_accepted_forms(make):
    x, y = _x(), np.arange(5)
    xs, _ = data.as_arrays(make(x, y), SHAPES)
    assert len(xs) == 1 and xs[0].dtype == np.float32
    np.testing.assert_array_equal(xs[0], x)


def test_npz_and_npy(tmp_path):
    x, y = _x(), np.arange(5)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    xs, labels = data.as_arrays(str(tmp_path / "d.npz"), SHAPES)
    np.testing.assert_array_equal(xs[0], x)
    np.testing.assert_array_equal(labels, y)
    np.save(tmp_path / "d.npy", x)
    np.testing.assert_array_equal(data.as_arrays(tmp_path / "d.npy", SHAPES)[0][0], x)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_npz_is_refused_and_never_unpickled(tmp_path):
    marker = str(tmp_path / "pwned")
    arr = np.empty(1, dtype=object)
    arr[0] = _Payload(marker)
    np.savez(tmp_path / "evil.npz", x=arr)
    with pytest.raises(ValueError, match="pickled"):
        data.as_arrays(str(tmp_path / "evil.npz"), SHAPES)
    assert not os.path.exists(marker)
    with open(tmp_path / "evil.npy", "wb") as f:
        np.save(f, arr, allow_pickle=True)
    with pytest.raises(ValueError, match="pickled"):
        data.load_npz(tmp_path / "evil.npy")
    assert not os.path.exists(marker)
    assert pickle  # The payload class above is what pickle would have run.


def test_errors_name_the_problem():
    x = _x()
    x[3, 1, 2] = np.inf
    with pytest.raises(ValueError, match="Inf in sample 3"):
        data.as_arrays(x, SHAPES)
    with pytest.raises(ValueError, match="axis 1 is 5, expected 4"):
        data.as_arrays(np.zeros((2, 5, 3), "float32"), SHAPES)
    with pytest.raises(ValueError, match="empty"):
        data.as_arrays(np.zeros((0, 4, 3), "float32"), SHAPES)
    with pytest.raises(ValueError, match="empty"):
        data.as_arrays(iter([]), SHAPES)
    with pytest.raises(TypeError, match="dtype <U1"):
        data.as_arrays(np.full((2, 4, 3), "a"), SHAPES)
    with pytest.raises(TypeError, match="Received: int"):
        data.as_arrays(3, SHAPES)
    with pytest.raises(FileNotFoundError):
        data.as_arrays("missing.npz", SHAPES)
