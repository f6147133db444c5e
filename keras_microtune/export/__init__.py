"""Conversion to TFLite / TFLite Micro, verification on the real runtimes, reports.

Runtimes (LiteRT, TFLite Micro, Vela) are imported only when used.
"""

from keras_microtune.export import targets
from keras_microtune.export._tflite import InvalidModelError
from keras_microtune.export.converter import (
    ConversionResult,
    DoesNotFitError,
    VerificationError,
    convert,
)
from keras_microtune.export.inspect import inspect

__all__ = [
    "ConversionResult",
    "DoesNotFitError",
    "InvalidModelError",
    "VerificationError",
    "convert",
    "inspect",
    "targets",
]
