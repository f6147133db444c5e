"""Clustering: tables per channel, fine-tuning, serialization, preservation in QAT."""

import keras
import numpy as np
import pytest

import keras_microtune as kmt
from keras_microtune.optimize import cluster


def _model():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.SeparableConv2D(16, 3)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(32, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x))


def _data(n=48):
    rng = np.random.default_rng(0)
    return rng.random((n, 8, 8, 1)).astype("float32"), rng.integers(0, 5, n)


def _per_channel_values(kernel, depthwise=False):
    channels = kernel.shape[-2] * kernel.shape[-1] if depthwise else kernel.shape[-1]
    view = kernel.reshape(-1, channels)
    return max(len(np.unique(view[:, c])) for c in range(channels))


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    clustered = kmt.optimize.cluster_weights(_model(), number_of_clusters=4)
    clustered.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x, y = _data()
    schedule = kmt.callbacks.ClusteringSchedule(
        freeze_assignments_epoch=1, freeze_centroids_epoch=1
    )
    history = clustered.fit(
        x, y, epochs=2, batch_size=16, callbacks=[schedule], verbose=0
    )
    return clustered, history.history


def test_fine_tuning_keeps_tables_and_logs(trained):
    clustered, history = trained
    assert set(kmt.optimize.clustering_summary(clustered).values()) <= {1, 2, 3, 4}
    assert history["assignments_frozen"] == [0.0, 1.0]
    assert history["centroids_frozen"] == [0.0, 1.0]
    assert history["assignments_changed"][1] == 0.0
    assert history["max_clusters_per_table"][-1] <= 4


def test_frozen_centroids_do_not_move(trained):
    clustered, _ = trained
    wrapper = next(
        w for w in clustered.layers if isinstance(w, kmt.optimize.ClusterWeights)
    )
    before = wrapper.centroids[0].numpy().copy()
    x, y = _data(16)
    clustered.fit(x, y, epochs=1, verbose=0)
    np.testing.assert_array_equal(wrapper.centroids[0].numpy(), before)


def test_strip_and_save_keep_outputs(trained, tmp_path):
    clustered, _ = trained
    x, _ = _data(8)
    expected = clustered.predict(x, verbose=0)
    path = str(tmp_path / "clustered.keras")
    clustered.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), expected)
    stripped = kmt.optimize.strip_clustering(reloaded)
    assert not any(
        isinstance(layer, kmt.optimize.ClusterWeights) for layer in stripped.layers
    )
    np.testing.assert_allclose(stripped.predict(x, verbose=0), expected, atol=1e-6)
    depthwise = stripped.get_layer("depthwise").kernel.numpy()
    assert _per_channel_values(depthwise, depthwise=True) <= 4
    assert _per_channel_values(stripped.layers[-1].kernel.numpy()) <= 4


def test_cluster_preserving_qat_keeps_int8_tables(trained, tools):
    clustered, _ = trained
    qat = kmt.optimize.quantize_model(clustered)
    qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    qat.fit(x, y, epochs=1, batch_size=16, verbose=0)
    for weights in tools.int8_weights(tools.to_int8(qat)):
        # TFLite layouts: channels on axis 0, or the last axis for depthwise.
        per_axis0 = max(len(np.unique(w)) for w in weights)
        per_last = max(
            len(np.unique(weights[..., c])) for c in range(weights.shape[-1])
        )
        assert min(per_axis0, per_last) <= 4


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="number_of_clusters"):
        kmt.optimize.cluster_weights(_model(), number_of_clusters=1)
    with pytest.raises(ValueError, match="cluster_per_channel"):
        kmt.optimize.cluster_weights(_model(), cluster_per_channel="auto")
    with pytest.raises(ValueError, match="no clustering wrappers"):
        model = _model()
        model.compile("adam", "mse")
        model.fit(
            *_data(4),
            epochs=1,
            verbose=0,
            callbacks=[kmt.callbacks.ClusteringSchedule()],
        )


def test_kmeans_is_exact_for_few_values():
    values = np.array([[0.0, 1.0, 1.0, 5.0, 5.0, 0.0]])
    centroids, labels = cluster.kmeans(values, 3)
    np.testing.assert_allclose(np.sort(centroids[0]), [0.0, 1.0, 5.0])
    np.testing.assert_allclose(centroids[0][labels[0]], values[0])
