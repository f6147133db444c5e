"""Route tf_keras (Keras 2) models to tensorflow-model-optimization.

tfmot only works on tf_keras models, and it sets `TF_USE_LEGACY_KERAS=1` in
the process environment when imported. We import it only when a tf_keras
model arrives and restore the environment right after, so Keras 3 code in
the same process is unaffected. Install with `pip install
keras_microtune[tfmot]`.
"""

import importlib
import os
import sys


def is_tf_keras_model(model):
    """True if `model` is a tf_keras model (never imports tf_keras itself)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("tf_keras"):
            return True
    tf_keras = sys.modules.get("tf_keras")
    return tf_keras is not None and isinstance(model, tf_keras.Model)


def tfmot():
    """Import tensorflow_model_optimization without leaking its env setting."""
    saved = os.environ.get("TF_USE_LEGACY_KERAS")
    try:
        module = importlib.import_module("tensorflow_model_optimization")
    except ImportError as error:
        raise ImportError(
            "tf_keras models are quantized and pruned with "
            "tensorflow-model-optimization. Install it with "
            "`pip install keras_microtune[tfmot]`."
        ) from error
    finally:
        if saved is None:
            os.environ.pop("TF_USE_LEGACY_KERAS", None)
        else:
            os.environ["TF_USE_LEGACY_KERAS"] = saved
    return module


def quantize_model(model):
    return tfmot().quantization.keras.quantize_model(model)


def prune_low_magnitude(model, target_sparsity, begin_step, end_step, frequency, power):
    sparsity = tfmot().sparsity.keras
    schedule = sparsity.PolynomialDecay(
        initial_sparsity=0.0,
        final_sparsity=target_sparsity,
        begin_step=begin_step,
        end_step=end_step,
        power=power,
        frequency=frequency,
    )
    return sparsity.prune_low_magnitude(model, pruning_schedule=schedule)


def strip_pruning(model):
    return tfmot().sparsity.keras.strip_pruning(model)


def update_pruning_step_callback():
    """tfmot's callback that advances pruning steps (needed in tf_keras fit)."""
    return tfmot().sparsity.keras.UpdatePruningStep()


def cluster_weights(model, number_of_clusters):
    clustering = tfmot().clustering.keras
    return clustering.cluster_weights(
        model,
        number_of_clusters=number_of_clusters,
        cluster_centroids_init=clustering.CentroidInitialization.LINEAR,
    )


def strip_clustering(model):
    return tfmot().clustering.keras.strip_clustering(model)
