"""One decorator that registers a class as Keras-serializable under our package."""

import contextlib

import keras

PACKAGE = "keras_microtune"


def serializable(cls):
    """Register `cls` with Keras under `keras_microtune>ClassName`."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


class KerasMicrotuneWarning(UserWarning):
    """Base class of the warnings keras_microtune emits."""


def strategy_scope(model):
    """The scope of `model`'s tf.distribute strategy; no scope on other backends.

    New variables made for a model (an optimizer, a callback's variable, a
    sub-model) belong under its strategy; only TensorFlow models have one.
    """
    strategy = getattr(model, "distribute_strategy", None)
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def sublayers(layer, include_self=False):
    """Every layer nested in `layer` (recursively), `layer` first if asked."""
    # Keras has no public recursive walk; `_flatten_layers` is what Keras'
    # own saving and summary code use.
    return list(layer._flatten_layers(include_self=include_self, recursive=True))
