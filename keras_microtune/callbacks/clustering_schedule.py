"""ClusteringSchedule: refresh assignments, then freeze them and the centroids."""

import keras
import numpy as np

from keras_microtune.callbacks._base import check_number


class ClusteringSchedule(keras.callbacks.Callback):
    """Drive and log clustering-aware fine-tuning (`kmt.optimize.cluster_weights`).

    Each `ClusterWeights` wrapper reassigns its weights to the nearest
    centroid every `update_frequency` steps inside the compiled train step.
    This callback stops the reassignments from `freeze_assignments_epoch`
    on (the centroids keep training on fixed clusters) and freezes the
    centroids from `freeze_centroids_epoch` on (the rest of the model
    adapts to them). It writes `"assignments_changed"` (fraction of
    clustered weights whose cluster changed this epoch),
    `"max_clusters_per_table"`, `"assignments_frozen"` and
    `"centroids_frozen"` to the epoch `logs`.

    Args:
        freeze_assignments_epoch: int or None. First epoch with fixed
            assignments. Defaults to `None` (never).
        freeze_centroids_epoch: int or None. First epoch with fixed
            centroids. Defaults to `None` (never).

    Example:

    >>> import keras, numpy as np
    >>> import keras_microtune as kmt
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8)])
    >>> clustered = kmt.optimize.cluster_weights(model, number_of_clusters=4)
    >>> clustered.compile("adam", "mse")
    >>> callback = kmt.callbacks.ClusteringSchedule(freeze_assignments_epoch=1)
    >>> history = clustered.fit(np.ones((8, 8)), np.ones((8, 8)), epochs=2,
    ...                         callbacks=[callback], verbose=0)
    >>> history.history["assignments_frozen"]
    [0.0, 1.0]
    """

    def __init__(self, freeze_assignments_epoch=None, freeze_centroids_epoch=None):
        super().__init__()
        for name, value in (
            ("freeze_assignments_epoch", freeze_assignments_epoch),
            ("freeze_centroids_epoch", freeze_centroids_epoch),
        ):
            if value is not None:
                check_number(name, value, low=0, integer=True)
        self.freeze_assignments_epoch = freeze_assignments_epoch
        self.freeze_centroids_epoch = freeze_centroids_epoch
        self._wrappers, self._previous = [], []

    def on_train_begin(self, logs=None):
        from keras_microtune.optimize import cluster

        self._wrappers = cluster.cluster_wrappers(self.model)
        if not self._wrappers:
            raise ValueError(
                f"ClusteringSchedule: model {self.model.name!r} has no clustering "
                "wrappers. Cluster it first: `model = "
                "kmt.optimize.cluster_weights(model, number_of_clusters=16)`, "
                "then compile and fit that model with this callback."
            )

    def _assignments(self):
        return [
            keras.ops.convert_to_numpy(a) for w in self._wrappers for a in w.assignments
        ]

    def _due(self, epoch, start):
        return start is not None and epoch >= start

    def on_epoch_begin(self, epoch, logs=None):
        from keras_microtune.optimize import cluster

        frozen = self._due(epoch, self.freeze_assignments_epoch)
        cluster.freeze_assignments(self.model, frozen)
        frozen = self._due(epoch, self.freeze_centroids_epoch)
        if frozen != bool(self._wrappers[0].centroids_frozen.numpy()):
            cluster.freeze_centroids(self.model, frozen)
        self._previous = self._assignments()

    def on_epoch_end(self, epoch, logs=None):
        from keras_microtune.optimize import cluster

        if logs is None:
            return
        current = self._assignments()
        changed = sum(int(np.sum(a != b)) for a, b in zip(current, self._previous))
        total = sum(a.size for a in current)
        logs["assignments_changed"] = changed / total if total else 0.0
        logs["max_clusters_per_table"] = float(
            max(cluster.clustering_summary(self.model).values())
        )
        wrapper = self._wrappers[0]
        logs["assignments_frozen"] = float(wrapper.assignments_frozen.numpy())
        logs["centroids_frozen"] = float(wrapper.centroids_frozen.numpy())
