"""Callbacks that adjust a fine-tuning parameter during `model.fit`."""

from keras_microtune.callbacks.activation_clip_anneal import ActivationClipAnneal
from keras_microtune.callbacks.clustering_schedule import ClusteringSchedule
from keras_microtune.callbacks.device_budget import DeviceBudget
from keras_microtune.callbacks.distillation_schedule import DistillationSchedule
from keras_microtune.callbacks.int8_evaluation import Int8Evaluation
from keras_microtune.callbacks.progressive_unfreeze import ProgressiveUnfreeze
from keras_microtune.callbacks.pruning_schedule import PruningSchedule
from keras_microtune.callbacks.quantization_schedule import QuantizationSchedule
from keras_microtune.callbacks.warmup_cosine import WarmupCosine

__all__ = [
    "ActivationClipAnneal",
    "ClusteringSchedule",
    "DeviceBudget",
    "DistillationSchedule",
    "Int8Evaluation",
    "ProgressiveUnfreeze",
    "PruningSchedule",
    "QuantizationSchedule",
    "WarmupCosine",
]
