"""Quantization-aware training, pruning and clustering for Keras 3.

Keras 3 models get native fake-quant QAT and magnitude pruning; tf_keras
models are routed to tensorflow-model-optimization with the same call.

Public API:
- `quantize_model(model, unsupported="raise", preserve_sparsity=True)`
- `prune_low_magnitude(model, target_sparsity=0.5, begin_step=0,
  end_step=1000, frequency=100, power=3)`
- `strip(model)`: remove pruning wrappers (QAT layers stay: the converter
  needs them to produce int8).

Hooks for schedules (`kmt.callbacks`): `set_quantization_enabled`,
`freeze_ranges`, `freeze_batch_norm`, `update_pruning_masks`,
`pruning_summary`, and the `pruning_step` variable of `PruneLowMagnitude`.
- `merge_adapters(model)` / `merge_report(model)`: fold LoRA (and
  MicroTune where exact) into the kernels they adapt (`optimize/merge.py`).
- `cluster_weights(model, number_of_clusters=16, ...)` and
  `strip_clustering(model)`: weight clustering for TFLite Micro's LUT
  compression (`optimize/cluster.py`), with the hooks
  `update_cluster_assignments`, `freeze_assignments`, `freeze_centroids`,
  `clustering_summary` and `preserve_clusters` (cluster-preserving QAT).
- `fold_batch_norm(model)`: BatchNorm folded into the conv/Dense before it
  (`optimize/fold.py`), so per-tensor clustering survives into int8.
"""

from keras_microtune.optimize.cluster import (
    ClusterWeights,
    cluster_weights,
    clustering_summary,
    freeze_assignments,
    freeze_centroids,
    preserve_clusters,
    strip_clustering,
    update_cluster_assignments,
)
from keras_microtune.optimize.fold import FoldedBatchNorm, fold_batch_norm
from keras_microtune.optimize.hooks import (
    freeze_batch_norm,
    freeze_ranges,
    set_quantization_enabled,
)
from keras_microtune.optimize.merge import merge_adapters, merge_report
from keras_microtune.optimize.prune import (
    PruneLowMagnitude,
    prune_low_magnitude,
    pruning_summary,
    strip,
    update_pruning_masks,
)
from keras_microtune.optimize.quantize import QUANTIZE_REGISTRY, quantize_model
from keras_microtune.optimize.quantize_conv import QuantizeConv
from keras_microtune.optimize.quantize_stages import QuantizedMicroTune
from keras_microtune.optimize.quantizers import ActivationQuantizer

__all__ = [
    "QUANTIZE_REGISTRY",
    "ActivationQuantizer",
    "ClusterWeights",
    "FoldedBatchNorm",
    "PruneLowMagnitude",
    "QuantizeConv",
    "QuantizedMicroTune",
    "cluster_weights",
    "fold_batch_norm",
    "clustering_summary",
    "freeze_assignments",
    "freeze_batch_norm",
    "freeze_centroids",
    "freeze_ranges",
    "merge_adapters",
    "merge_report",
    "prune_low_magnitude",
    "preserve_clusters",
    "pruning_summary",
    "quantize_model",
    "set_quantization_enabled",
    "strip",
    "strip_clustering",
    "update_cluster_assignments",
    "update_pruning_masks",
]
