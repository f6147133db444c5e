"""One decorator that registers a class as Keras-serializable under our package."""

import keras

PACKAGE = "keras_microtune"


def serializable(cls):
    """Register `cls` with Keras under `keras_microtune>ClassName`."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


class KerasMicrotuneWarning(UserWarning):
    """Base class of the warnings keras_microtune emits."""
