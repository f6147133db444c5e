"""Magnitude pruning for Keras 3 with a polynomial-decay sparsity schedule.

`prune_low_magnitude(model, ...)` wraps every layer that owns kernels
(Dense, convolutions, the stage layers) in `PruneLowMagnitude`. Each wrapper
keeps one mask per kernel and a step counter; at every training step it
advances `pruning_step`, recomputes the masks when the schedule says so
(every `frequency` steps from `begin_step`, and at `end_step`, so
`target_sparsity` is reached at `end_step` whatever `frequency` is; tfmot's
`PolynomialDecay` updates on the multiples only) and multiplies
the kernels by their masks, so pruned weights stay zero.

Hooks (for `kmt.callbacks.PruningSchedule`):
- the wrapper variable `pruning_step` (set it to drive the schedule from
  outside, e.g. by epoch);
- `update_pruning_masks(model, step=None)`: recompute and apply every mask
  now, at `step` (default: each wrapper's own step);
- `pruning_summary(model)`: `{layer path: sparsity}` for every kernel;
- `strip(model)`: remove the wrappers, leaving plain layers with zeros.
"""

import inspect

import keras
from keras import ops

from keras_microtune._api import serializable
from keras_microtune.optimize import graph, tfmot_bridge

STEP = "pruning_step"


@serializable
class PruneLowMagnitude(keras.layers.Layer):
    """Prune the smallest-magnitude kernel weights of `layer` on a schedule.

    Sparsity at step `t` is `target * (1 - (1 - p) ** power)` with
    `p = clip((t - begin_step) / (end_step - begin_step), 0, 1)`. Masks are
    recomputed at `begin_step`, every `frequency` steps after it, and at
    `end_step` (steps count training batches from 0).

    Args:
        layer: keras.layers.Layer. The layer whose kernels are pruned.
        target_sparsity: float in [0, 1). Final fraction of zeros.
        begin_step: int. First step that prunes.
        end_step: int. Step at which `target_sparsity` is reached (the
            last mask update).
        frequency: int. Steps between mask updates before `end_step`.
        power: int. Exponent of the polynomial decay.
    """

    def __init__(
        self, layer, target_sparsity, begin_step, end_step, frequency, power, **kwargs
    ):
        super().__init__(**kwargs)
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        self.layer = layer
        self.target_sparsity = float(target_sparsity)
        self.begin_step = int(begin_step)
        self.end_step = int(end_step)
        self.frequency = int(frequency)
        self.power = int(power)

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.pruning_step = self.add_weight(
            name=STEP, shape=(), initializer="zeros", trainable=False
        )
        self.masks = [
            self.add_weight(
                name=f"mask_{i}", shape=v.shape, initializer="ones", trainable=False
            )
            for i, v in enumerate(graph.kernels(self.layer))
        ]
        # Optimizers apply `variable.constraint` after each update: masking
        # there keeps pruned weights at zero between steps, not just in call
        # (on JAX only in call: see `graph.state_constraints_supported`).
        if graph.state_constraints_supported():
            for kernel, mask in zip(graph.kernels(self.layer), self.masks):
                kernel.constraint = graph.MaskConstraint(mask, kernel.constraint)

    def sparsity_at(self, step):
        step = ops.cast(step, "float32")
        span = max(self.end_step - self.begin_step, 1)
        progress = ops.clip((step - self.begin_step) / span, 0.0, 1.0)
        return self.target_sparsity * (1.0 - (1.0 - progress) ** self.power)

    def last_update_step(self, step):
        """The last scheduled mask update at or before `step` (None if none)."""
        step = min(int(step), self.end_step)
        if step < self.begin_step:
            return None
        if step == self.end_step:
            return step
        return step - (step - self.begin_step) % self.frequency

    def _new_mask(self, kernel, sparsity):
        magnitude = ops.reshape(ops.abs(kernel), (-1,))
        count = ops.cast(ops.round(sparsity * magnitude.shape[0]), "int32")
        threshold = ops.take(ops.sort(magnitude), ops.maximum(count - 1, 0))
        mask = ops.cast(ops.abs(kernel) > threshold, "float32")
        return ops.where(count > 0, mask, ops.ones_like(mask))

    def update_masks(self, step=None, force=True):
        """Recompute the masks at `step` (a step due now if not `force`)."""
        step = self.pruning_step if step is None else ops.cast(step, "float32")
        turn = ops.logical_or(  # Every `frequency` steps, and at `end_step`.
            ops.equal(ops.mod(step - self.begin_step, self.frequency), 0.0),
            ops.equal(step, self.end_step),
        )
        due = ops.logical_and(
            turn,
            ops.logical_and(
                ops.greater_equal(step, self.begin_step),
                ops.less_equal(step, self.end_step),
            ),
        )
        due = ops.logical_or(due, force)
        sparsity = self.sparsity_at(step)
        for kernel, mask in zip(graph.kernels(self.layer), self.masks):
            # The masked kernel: a pruned weight stays pruned (on JAX the
            # stored kernel is not masked between steps).
            new = self._new_mask(kernel * mask, sparsity)
            mask.assign(ops.where(due, new, mask.value))
        self.apply_masks()

    def apply_masks(self):
        for kernel, mask in zip(graph.kernels(self.layer), self.masks):
            kernel.assign(kernel * mask)

    def call(self, inputs, training=None, **kwargs):
        if training:
            self.update_masks(force=False)
            self.pruning_step.assign_add(1.0)
        else:
            self.apply_masks()
        if "training" in inspect.signature(self.layer.call).parameters:
            kwargs["training"] = training
        return self.layer(inputs, **kwargs)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "layer": keras.saving.serialize_keras_object(self.layer),
            "target_sparsity": self.target_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "frequency": self.frequency,
            "power": self.power,
        }


def prune_low_magnitude(
    model,
    target_sparsity=0.5,
    begin_step=0,
    end_step=1000,
    frequency=100,
    power=3,
):
    """Return a copy of `model` whose kernels are pruned while it trains.

    Every layer with a kernel (Dense, convolutions, `FeatureStage`,
    `EmbeddingStage`, `MicroTune`, `OutputStage`) is wrapped in
    `PruneLowMagnitude`; masks follow a polynomial-decay schedule from 0 to
    `target_sparsity` between `begin_step` and `end_step`, updated every
    `frequency` training steps and at `end_step` (so the target is reached
    there even when `frequency` does not divide `end_step - begin_step`), and
    applied at every step. tf_keras models
    go to tfmot's `prune_low_magnitude` (add its `UpdatePruningStep`
    callback, available as `tfmot_bridge.update_pruning_step_callback()`).

    Args:
        model: keras.Model. A built Sequential or Functional model.
        target_sparsity: float in [0, 1). Final fraction of zero weights.
            Defaults to `0.5`.
        begin_step: int. Training step where pruning starts. Defaults to `0`.
        end_step: int. Step where `target_sparsity` is reached (steps
            count training batches from 0, so a fit of `n` steps reaches it
            when `end_step <= n - 1`). Defaults to `1000`.
        frequency: int. Steps between mask updates before `end_step`.
            Defaults to `100`.
        power: int. Exponent of the polynomial decay. Defaults to `3`.

    Returns:
        A new keras.Model.
    """
    if not isinstance(target_sparsity, (int, float)) or not 0 <= target_sparsity < 1:
        raise ValueError(
            "Received an invalid value for `target_sparsity`, expected a float in "
            f"[0, 1). Received: target_sparsity={target_sparsity!r}"
        )
    for name, value in (("begin_step", begin_step), ("frequency", frequency)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (name == "frequency")
        ):
            raise ValueError(
                f"Received an invalid value for `{name}`, expected a "
                f"{'positive' if name == 'frequency' else 'non-negative'} integer. "
                f"Received: {name}={value!r}"
            )
    if (
        isinstance(end_step, bool)
        or not isinstance(end_step, int)
        or end_step < begin_step
    ):
        raise ValueError(
            "Received an invalid value for `end_step`, expected an integer >= "
            f"begin_step={begin_step}. Received: end_step={end_step!r}"
        )
    args = (target_sparsity, begin_step, end_step, frequency, power)
    if tfmot_bridge.is_tf_keras_model(model):
        return tfmot_bridge.prune_low_magnitude(model, *args)
    graph.check_model(model, "prune_low_magnitude()")

    def replace(layer, x):
        shape = keras.tree.map_structure(lambda t: t.shape, x)
        copy = graph.clone_layer(layer, shape)
        if isinstance(layer, PruneLowMagnitude) or not graph.kernels(copy):
            return copy
        return PruneLowMagnitude(copy, *args, name=f"prune_{layer.name}")

    return graph.rewrite(model, replace)


def _strip_layer(layer, x):
    if not isinstance(layer, PruneLowMagnitude):
        return layer
    shape = keras.tree.map_structure(lambda t: t.shape, x)
    copy = graph.clone_layer(layer.layer, shape)
    for kernel, mask in zip(graph.kernels(copy), layer.masks):
        kernel.assign(kernel * mask)
    return copy


def has_pruning(model):
    return any(isinstance(layer, PruneLowMagnitude) for layer in graph.walk(model))


def strip(model):
    """Remove pruning wrappers, keeping the zeros; QAT layers stay.

    A QAT model keeps its fake-quant layers: they carry the int8 ranges the
    converter needs. tf_keras models go to tfmot's `strip_pruning`.
    """
    if tfmot_bridge.is_tf_keras_model(model):
        return tfmot_bridge.strip_pruning(model)
    return graph.rewrite(model, _strip_layer)


def strip_pruning_for_quantization(model):
    return strip(model) if has_pruning(model) else model


def update_pruning_masks(model, step=None):
    """Recompute and apply every pruning mask of `model` now."""
    for layer in graph.walk(model):
        if isinstance(layer, PruneLowMagnitude):
            layer.update_masks(step=step, force=True)


def pruning_summary(model):
    """`{kernel path: fraction of zeros}` for every kernel of `model`."""
    masks = {}
    for layer in graph.walk(model):
        if isinstance(layer, PruneLowMagnitude):
            masks.update(zip(map(id, graph.kernels(layer.layer)), layer.masks))
    summary = {}
    for variable in model.weights:
        if "kernel" in variable.name and len(variable.shape) >= 2:
            values = ops.convert_to_numpy(variable)
            if id(variable) in masks:  # What the model computes with.
                values = values * ops.convert_to_numpy(masks[id(variable)])
            summary[variable.path] = float((values == 0).mean())
    return summary
