"""The affine map of a model's leading `Rescaling` / `Normalization` layers.

`x = raw * scale + offset` before the rest of the model. The converter folds
it into the input quantization (`keras_microtune.export.preprocessing`) and
QAT fake-quantizes its output rather than the raw input
(`keras_microtune.optimize.quantize`): both read it here, so they agree on
which affines fold (`Affine.folds`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_microtune.optimize import graph


@dataclasses.dataclass
class Affine:
    """`x = raw * scale + offset`, arrays broadcastable to `(1, *input_shape)`."""

    scale: np.ndarray
    offset: np.ndarray
    layers: list  # Layer names, in order.
    kinds: list = dataclasses.field(default_factory=list)  # Their class names.

    @property
    def per_tensor(self) -> bool:
        return bool(np.ptp(self.scale) == 0 and np.ptp(self.offset) == 0)

    @property
    def per_channel(self) -> bool:
        """One scale and offset per channel of the last axis (or per tensor)."""
        rows = [np.reshape(a, (-1, a.shape[-1])) for a in (self.scale, self.offset)]
        return all(bool(np.all(np.ptp(r, axis=0) == 0)) for r in rows)

    @property
    def folds(self) -> bool:
        """Folded into the input quantization (per tensor or channel, scale > 0)."""
        return self.per_channel and bool(np.all(self.scale > 0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x * self.scale + self.offset).astype("float32")

    def then(self, scale, offset, layer) -> Affine:
        """This affine followed by `layer`'s `x * scale + offset`."""
        return Affine(
            self.scale * scale,
            self.offset * scale + offset,
            [*self.layers, layer.name],
            [*self.kinds, type(layer).__name__],
        )


def _layer_affine(layer):
    """`(scale, offset)` of a Rescaling or adapted Normalization layer, or None."""
    import keras

    if isinstance(layer, keras.layers.Rescaling):
        return (
            np.asarray(layer.scale, dtype="float64"),
            np.asarray(layer.offset, dtype="float64"),
        )
    if isinstance(layer, keras.layers.Normalization) and layer.mean is not None:
        mean = np.asarray(layer.mean, dtype="float64")
        std = np.maximum(
            np.sqrt(np.asarray(layer.variance, "float64")), keras.config.epsilon()
        )
        if layer.invert:
            return std, mean
        return 1.0 / std, -mean / std
    return None


def leading_affine(model):
    """`(Affine, model without those layers)` for a single-input Keras 3 model
    that starts with Rescaling/Normalization layers; `(None, None)` otherwise."""
    import keras

    if not isinstance(model, keras.Model) or keras.backend.backend() != "tensorflow":
        return None, None
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None, None
    if not inputs or len(inputs) != 1:
        return None, None
    shape = (1, *inputs[0].shape[1:])
    affine = Affine(np.ones(shape), np.zeros(shape), [])
    tensor, last = inputs[0], None
    nodes = graph.layer_nodes(model)  # Its own calls: layers may be shared.
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        params = _layer_affine(layer)
        node = nodes.get(id(layer))  # None: called more than once.
        if params is None or node is None:
            break
        if len(node.input_tensors) != 1 or node.input_tensors[0] is not tensor:
            break
        affine = affine.then(*params, layer)
        tensor, last = node.output_tensors[0], layer
    if last is None:
        return None, None
    try:
        rest = keras.Model(tensor, model.outputs, name=model.name)
    except ValueError:  # The raw input feeds another layer too.
        return None, None
    affine.scale = np.broadcast_to(affine.scale, shape).astype("float64")
    affine.offset = np.broadcast_to(affine.offset, shape).astype("float64")
    return affine, rest
