"""Weight clustering for Keras 3, shaped for TFLite Micro's LUT compression.

`cluster_weights(model, number_of_clusters=16)` wraps every layer that owns
kernels in `ClusterWeights`. Each kernel is replaced in the forward pass by
`centroids[assignments]`: a small table of trainable values per output
channel. Symmetric int8 quantization maps each channel's values to at most
`number_of_clusters` int8 values, whether the scale is per channel
(convolutions) or per tensor (Dense), also after BatchNorm folding, so the
int8 tensor holds at most `number_of_clusters` values per output channel
and `kmt.convert(..., compression="lut4")` stores it as 4-bit indices.
The layer's own kernel stays as the latent weights: it is trained by a
straight-through gradient and every `update_frequency` training steps each
weight is reassigned to its nearest centroid.

Hooks (for `kmt.callbacks.ClusteringSchedule`), all inside a compiled `fit`:
- `update_cluster_assignments(model)`: reassign every weight now;
- `freeze_assignments(model, frozen)`, `freeze_centroids(model, frozen)`;
- `clustering_summary(model)`: `{kernel path: most values in one table}`.

Cluster-preserving QAT: `kmt.optimize.quantize_model` strips the wrappers of
a clustered model and calls `preserve_clusters`, which constrains each kernel
so weights that share a value keep sharing one (the mean of the group after
each optimizer step), so the clusters survive into int8.
"""

import inspect

import keras
import numpy as np
from keras import ops

from keras_microtune._api import serializable, sublayers
from keras_microtune.optimize import graph, tfmot_bridge

ASSIGNMENTS_FROZEN = "assignments_frozen"
CENTROIDS_FROZEN = "centroids_frozen"


def _depthwise_kernels(layer):
    """ids of the depthwise kernels in `layer` (their channels: in * multiplier)."""
    found = set()
    for sub in sublayers(layer, include_self=True):
        if isinstance(
            sub, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
        ):
            found.add(id(sub.kernel))
        elif isinstance(
            sub, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
        ):
            found.add(id(sub.depthwise_kernel))
    return found


def _channels(kernel, depthwise):
    """Output channels of a kernel: depthwise kernels count in * multiplier."""
    shape = kernel.shape
    if id(kernel) in depthwise and len(shape) >= 3:
        return int(shape[-2] * shape[-1])
    return int(shape[-1])


def kmeans(values, k, iterations=12):
    """Per-row 1-D k-means. `values` (T, n) -> centroids (T, k), labels (T, n)."""
    values = np.asarray(values, "float64")
    # Density-based start (quantiles); rows with at most k values are exact.
    centroids = np.quantile(values, np.linspace(0, 1, k), axis=1).T
    for row, v in enumerate(values):
        unique = np.unique(v)
        if len(unique) <= k:
            centroids[row] = np.pad(unique, (0, k - len(unique)), mode="edge")
    for _ in range(iterations):
        labels = np.abs(values[:, :, None] - centroids[:, None, :]).argmin(-1)
        one_hot = labels[:, :, None] == np.arange(k)
        counts = one_hot.sum(1)
        sums = (one_hot * values[:, :, None]).sum(1)
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
    labels = np.abs(values[:, :, None] - centroids[:, None, :]).argmin(-1)
    return centroids.astype("float32"), labels


def _tables(view, per_channel):
    """A (m, C) kernel view as rows of tables: (T, n)."""
    return view.T if per_channel else view.reshape(1, -1)


class _FreezeConstraint:
    """Keep centroids at their snapshot while the frozen flag is set."""

    def __init__(self, flag, snapshot):
        self.flag, self.snapshot = flag, snapshot

    def __call__(self, value):
        return ops.where(self.flag > 0.5, self.snapshot, value)


@serializable
class ClusterWeights(keras.layers.Layer):
    """Cluster the kernels of `layer`: a few trainable values per table.

    Args:
        layer: keras.layers.Layer. A built layer with kernels (Dense,
            Conv, DepthwiseConv, SeparableConv, the keras_microtune stages).
        number_of_clusters: int in [2, 128]. Values per table.
        cluster_per_channel: bool. One table per output channel (what
            TFLite Micro's LUT compression stores), or one per kernel.
        update_frequency: int. Training steps between reassignments.
    """

    def __init__(
        self,
        layer,
        number_of_clusters=16,
        cluster_per_channel=True,
        update_frequency=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        self.layer = layer
        self.number_of_clusters = int(number_of_clusters)
        self.cluster_per_channel = cluster_per_channel
        self.update_frequency = int(update_frequency)

    def _per_channel(self, kernel):
        return bool(self.cluster_per_channel)

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        k = self.number_of_clusters
        self.cluster_step = self.add_weight(
            name="cluster_step", shape=(), initializer="zeros", trainable=False
        )
        self.assignments_frozen = self.add_weight(
            name=ASSIGNMENTS_FROZEN, shape=(), initializer="zeros", trainable=False
        )
        self.centroids_frozen = self.add_weight(
            name=CENTROIDS_FROZEN, shape=(), initializer="zeros", trainable=False
        )
        self.centroids, self.assignments, self._offsets = [], [], []
        self._snapshots, self._tables_of = [], []
        depthwise = _depthwise_kernels(self.layer)
        for i, kernel in enumerate(graph.kernels(self.layer)):
            channels = _channels(kernel, depthwise)
            rows = int(np.prod(kernel.shape)) // channels
            per_channel = self._per_channel(kernel)
            tables = channels if per_channel else 1
            centroids = self.add_weight(
                name=f"centroids_{i}", shape=(tables, k), initializer="zeros"
            )
            snapshot = self.add_weight(
                name=f"frozen_centroids_{i}",
                shape=(tables, k),
                initializer="zeros",
                trainable=False,
            )
            if graph.state_constraints_supported():  # On JAX: in `_centroids`.
                centroids.constraint = _FreezeConstraint(
                    self.centroids_frozen, snapshot
                )
            self.centroids.append(centroids)
            self._snapshots.append(snapshot)
            self.assignments.append(
                self.add_weight(
                    name=f"assignments_{i}",
                    shape=(rows, channels),
                    initializer="zeros",
                    dtype="int32",
                    trainable=False,
                )
            )
            table = np.arange(channels) if per_channel else np.zeros(channels)
            self._tables_of.append(table.astype("int32"))
            self._offsets.append((table * k).astype("int32"))

    def initialize(self):
        """Set centroids and assignments by k-means on the current kernels."""
        for i, kernel in enumerate(graph.kernels(self.layer)):
            view = ops.convert_to_numpy(kernel).reshape(self.assignments[i].shape)
            per_channel = self._per_channel(kernel)
            centroids, labels = kmeans(
                _tables(view, per_channel), self.number_of_clusters
            )
            labels = labels.T if per_channel else labels.reshape(view.shape)
            self.centroids[i].assign(centroids)
            self._snapshots[i].assign(centroids)
            self.assignments[i].assign(labels.astype("int32"))

    def _centroids(self, i):
        """Centroids `i` as the model uses them: the snapshot while frozen."""
        frozen = self.centroids_frozen.value > 0.5
        return ops.where(frozen, self._snapshots[i].value, self.centroids[i].value)

    def _view(self, i, kernel):
        return ops.reshape(kernel, self.assignments[i].shape)

    def clustered_kernel(self, i, kernel=None):
        """Kernel `i` as `centroids[assignments]`, in the kernel's shape."""
        kernel = graph.kernels(self.layer)[i] if kernel is None else kernel
        flat = ops.reshape(self._centroids(i), (-1,))
        index = self.assignments[i] + self._offsets[i]
        return ops.reshape(ops.take(flat, index), kernel.shape)

    def update_assignments(self, force=True):
        """Reassign each latent weight to its nearest centroid."""
        due = ops.logical_and(
            ops.equal(ops.mod(self.cluster_step, self.update_frequency), 0.0),
            self.assignments_frozen < 0.5,
        )
        due = ops.logical_or(due, force)
        for i, kernel in enumerate(graph.kernels(self.layer)):
            view = self._view(i, ops.convert_to_tensor(kernel))
            tables = ops.take(self._centroids(i), self._tables_of[i], axis=0)  # (C,k)
            distance = ops.abs(ops.expand_dims(view, -1) - tables[None])
            nearest = ops.cast(ops.argmin(distance, axis=-1), "int32")
            self.assignments[i].assign(
                ops.where(due, nearest, self.assignments[i].value)
            )

    def call(self, inputs, training=None, **kwargs):
        if training:
            self.update_assignments(force=False)
            self.cluster_step.assign_add(1.0)
        kernels = graph.kernels(self.layer)
        # The layer's other variables keep their current values in the scope
        # (on JAX an unmapped variable would read its purged storage).
        others = [v for v in self.layer.variables if all(v is not k for k in kernels)]
        mapping = [(v, v.value) for v in others]
        for i, kernel in enumerate(kernels):
            value = self.clustered_kernel(i, kernel)
            if training:  # Straight-through: the latent weights learn too.
                latent = ops.convert_to_tensor(kernel)
                value = value + (latent - ops.stop_gradient(latent))
            mapping.append((kernel, value))
        if "training" in inspect.signature(self.layer.call).parameters:
            kwargs["training"] = training
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = self.layer(inputs, **kwargs)
        for variable in self.layer.non_trainable_variables:  # e.g. BatchNorm.
            value = scope.get_current_value(variable)
            if value is not None and all(variable is not k for k in kernels):
                variable.assign(value)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "layer": keras.saving.serialize_keras_object(self.layer),
            "number_of_clusters": self.number_of_clusters,
            "cluster_per_channel": self.cluster_per_channel,
            "update_frequency": self.update_frequency,
        }


def _check_int(name, value, low, high=None):
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(
            f"Received an invalid value for `{name}`, expected an integer "
            f"{bound}. Received: {name}={value!r}"
        )


def cluster_weights(
    model,
    number_of_clusters=16,
    cluster_per_channel=True,
    update_frequency=1,
):
    """Return a copy of `model` whose kernels are clustered while it trains.

    Every layer with a kernel is wrapped in `ClusterWeights`, initialised by
    k-means on its current weights (so the copy is already a post-training
    clustered model; `strip_clustering` of it converts as is). Fine-tuning
    trains the centroids and reassigns weights every `update_frequency`
    steps. tf_keras models go to tfmot's `cluster_weights` (linear centroid
    initialisation).

    Args:
        model: keras.Model. A built Sequential or Functional model.
        number_of_clusters: int in [2, 128]. Values per table; use
            `2**bits` for `compression=f"lut{bits}"`. Defaults to `16`.
        cluster_per_channel: bool. One table of centroids per output
            channel (what LUT compression stores; per-channel tables keep
            more accuracy), or one per kernel. Defaults to `True`.
        update_frequency: int. Training steps between reassignments.
            Defaults to `1`.

    Returns:
        A new keras.Model.

    Example:

    >>> import keras
    >>> import keras_microtune as kmt
    >>> model = keras.Sequential([keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(8, 3), keras.layers.Flatten(),
    ...     keras.layers.Dense(3)])
    >>> clustered = kmt.optimize.cluster_weights(model, number_of_clusters=4)
    >>> max(kmt.optimize.clustering_summary(clustered).values()) <= 4
    True
    """
    _check_int("number_of_clusters", number_of_clusters, 2, 128)
    _check_int("update_frequency", update_frequency, 1)
    if not isinstance(cluster_per_channel, bool):
        raise ValueError(
            "Received an invalid value for `cluster_per_channel`, expected a "
            f"bool. Received: cluster_per_channel={cluster_per_channel!r}"
        )
    if tfmot_bridge.is_tf_keras_model(model):
        return tfmot_bridge.cluster_weights(model, number_of_clusters)
    graph.check_model(model, "cluster_weights()")

    def replace(layer, x):
        shape = keras.tree.map_structure(lambda t: t.shape, x)
        if isinstance(layer, ClusterWeights):
            return graph.clone_layer(layer, shape)
        copy = graph.clone_layer(layer, shape)
        if not graph.kernels(copy):
            return copy
        wrapper = ClusterWeights(
            copy,
            number_of_clusters,
            cluster_per_channel,
            update_frequency,
            name=f"cluster_{layer.name}",
        )
        wrapper.build(shape)
        wrapper.initialize()
        return wrapper

    return graph.rewrite(model, replace)


def _strip_layer(layer, x):
    if not isinstance(layer, ClusterWeights):
        return layer
    shape = keras.tree.map_structure(lambda t: t.shape, x)
    copy = graph.clone_layer(layer.layer, shape)
    for i, kernel in enumerate(graph.kernels(copy)):
        kernel.assign(layer.clustered_kernel(i, kernel))
    return copy


def has_clustering(model):
    return any(isinstance(layer, ClusterWeights) for layer in graph.walk(model))


def strip_clustering(model):
    """Remove clustering wrappers, leaving plain layers with clustered kernels.

    tf_keras models go to tfmot's `strip_clustering`.
    """
    if tfmot_bridge.is_tf_keras_model(model):
        return tfmot_bridge.strip_clustering(model)
    return graph.rewrite(model, _strip_layer)


def cluster_wrappers(model):
    """The `ClusterWeights` wrappers of `model`, nested models included."""
    return [layer for layer in graph.walk(model) if isinstance(layer, ClusterWeights)]


def update_cluster_assignments(model):
    """Reassign every clustered weight of `model` to its nearest centroid now."""
    for wrapper in cluster_wrappers(model):
        wrapper.update_assignments(force=True)


def freeze_assignments(model, frozen=True):
    """Stop (or resume) reassigning weights during training; returns the count."""
    wrappers = cluster_wrappers(model)
    for wrapper in wrappers:
        wrapper.assignments_frozen.assign(float(bool(frozen)))
    return len(wrappers)


def freeze_centroids(model, frozen=True):
    """Keep (or release) the centroids at their current values."""
    wrappers = cluster_wrappers(model)
    for wrapper in wrappers:
        was_frozen = float(ops.convert_to_numpy(wrapper.centroids_frozen)) > 0.5
        for centroids, snapshot in zip(wrapper.centroids, wrapper._snapshots):
            # Copies (NumPy): on JAX two variables must not share one buffer.
            if frozen and not was_frozen:
                snapshot.assign(ops.convert_to_numpy(centroids))
            elif not frozen and was_frozen:  # Resume from the frozen values.
                centroids.assign(ops.convert_to_numpy(snapshot))
        wrapper.centroids_frozen.assign(float(bool(frozen)))
    return len(wrappers)


def _max_values_per_table(values, per_channel, channels):
    view = values.reshape(-1, channels)
    tables = _tables(view, per_channel)
    return max(len(np.unique(row)) for row in tables)


def clustering_summary(model):
    """`{kernel path: most distinct values in one table}` for clustered kernels."""
    summary = {}
    for wrapper in cluster_wrappers(model):
        depthwise = _depthwise_kernels(wrapper.layer)
        for i, kernel in enumerate(graph.kernels(wrapper.layer)):
            values = ops.convert_to_numpy(wrapper.clustered_kernel(i, kernel))
            channels = _channels(kernel, depthwise)
            per_channel = wrapper._per_channel(kernel)
            summary[kernel.path] = _max_values_per_table(values, per_channel, channels)
    return summary


def number_of_clusters(model):
    """The largest `number_of_clusters` of the model's wrappers, or None."""
    counts = [w.number_of_clusters for w in cluster_wrappers(model)]
    return max(counts) if counts else None


class _ClusterConstraint:
    """Replace each weight by the mean of the weights that shared its value."""

    def __init__(self, index, tables, shape, previous=None):
        self.index = index  # (m, C) int32 segment ids
        self.tables = tables
        self.counts = np.maximum(np.bincount(index.ravel(), minlength=tables), 1)
        self.shape = shape
        self.previous = previous

    def __call__(self, kernel):
        view = ops.reshape(kernel, self.index.shape)
        ids = ops.convert_to_tensor(self.index.ravel())
        sums = ops.segment_sum(ops.reshape(view, (-1,)), ids, self.tables)
        means = sums / ops.convert_to_tensor(self.counts.astype("float32"))
        out = ops.reshape(ops.take(means, ids), self.shape)
        return out if self.previous is None else self.previous(out)


def preserve_clusters(model, number_of_clusters=16):
    """Constrain clustered kernels of `model` (e.g. a QAT model) to stay clustered.

    A kernel is clustered when it takes at most `number_of_clusters` distinct
    values (per tensor, else per output channel). After every optimizer
    step, weights that shared a value are set to their mean, so each table
    keeps at most `number_of_clusters` values through QAT and into int8.
    Returns the number of kernels constrained.
    """
    count = 0
    for layer in graph.walk(model):
        depthwise = _depthwise_kernels(layer)
        for variable in layer.weights:
            if "kernel" not in variable.name or len(variable.shape) < 2:
                continue
            if isinstance(variable.constraint, _ClusterConstraint):
                continue
            values = ops.convert_to_numpy(variable)
            channels = _channels(variable, depthwise)
            view = values.reshape(-1, channels)
            if len(np.unique(view)) <= number_of_clusters:
                _, index = np.unique(view, return_inverse=True)
                index, tables = index.reshape(view.shape), int(index.max()) + 1
            elif _max_values_per_table(values, True, channels) <= number_of_clusters:
                index = np.zeros(view.shape, "int64")
                for c in range(channels):
                    _, labels = np.unique(view[:, c], return_inverse=True)
                    index[:, c] = labels + c * number_of_clusters
                tables = channels * number_of_clusters
            else:
                continue
            variable.constraint = _ClusterConstraint(
                index.astype("int32"),
                tables,
                tuple(variable.shape),
                variable.constraint,
            )
            count += 1
    return count
