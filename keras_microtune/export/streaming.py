"""Streaming conversion: a recurrent model as a one-frame-per-invoke model.

`kmt.convert(model, ..., streaming=True)` converts `StepModel(model)`: the
same layers and weights, fed one frame `(1, features)` per invoke. After
frame `t` the output is what the full-sequence model gives for the frames
`0..t`: per step for a `return_sequences=True` output, the final output once
the last frame is in otherwise. Firmware calls `MicroInterpreter::Reset()`
at the start of each sequence, which zeroes the state. The state lives in
one of two forms (`StepModel.form`):

- `"fused"` (every recurrent layer a forward LSTM that `recurrent.fusable`
  accepts): the model with a one-step time axis, each LSTM the fused int8
  `UNIDIRECTIONAL_SEQUENCE_LSTM`. The op keeps `h` (int8) and `c` (int16) in
  its variable tensors, which persist from one invoke to the next: exactly
  the full-sequence kernel's arithmetic, one step per invoke.
- `"variables"` (GRU, SimpleRNN, or LSTMs the fused op cannot compute): each
  layer's cell, one step, with its state in TFLite resource variables
  (VAR_HANDLE / READ_VARIABLE / ASSIGN_VARIABLE, initialised by CALL_ONCE).
  The variables hold float32, but each frame the state is re-quantized to
  int8 on entering the int8 cell (QUANTIZE after READ_VARIABLE), so it is
  carried at 8 bits, the LSTM cell state included.

Layers before and between recurrent layers must act on each frame alone
(Dense, activations, normalisation over the last axis, TimeDistributed,
element-wise merges); after a `return_sequences=False` layer anything goes.
Backward layers (`go_backwards`, `Bidirectional`) need future frames and are
refused.
"""

from __future__ import annotations

import numpy as np

FORMS = ("fused", "variables")
STATE = {
    "fused": "UNIDIRECTIONAL_SEQUENCE_LSTM variable tensors (h int8, c int16)",
    "variables": "resource variables (float32 storage, re-quantized to int8 "
    "each frame)",
}

# Layers that map each frame independently, so they run on one frame as well.
_PER_FRAME = (
    "Dense",
    "EinsumDense",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "PReLU",
    "ELU",
    "Softmax",
    "Dropout",
    "GaussianNoise",
    "GaussianDropout",
    "SpatialDropout1D",
    "LayerNormalization",
    "BatchNormalization",
    "Rescaling",
    "Normalization",
    "Add",
    "Subtract",
    "Multiply",
    "Average",
    "Maximum",
    "Minimum",
    "Concatenate",
    "MicroTune",
    "InputLayer",
)


def _rnn_types():
    import keras

    return (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)


class _States:
    """The state variables, held outside Keras' layer tracking."""

    def __init__(self):
        self.variables = []


class StepModel:
    """`model` evaluated one frame at a time, its recurrent state in variables.

    Args:
        model: keras.Model. Functional or Sequential, input `(timesteps,
            features)`, holding at least one LSTM/GRU/SimpleRNN.

    Attributes:
        frame_shape: `(features,)`. timesteps: the model's sequence length.
        layers: one row per recurrent layer: `{"layer", "type", "states"}`.
        sequence_output: True when the model's output keeps the time axis.
        form: `"fused"` or `"variables"`: where the converted model keeps
            the state (see the module docstring).
    """

    def __init__(self, model):
        import keras
        import tensorflow as tf

        from keras_microtune.optimize import graph

        graph.check_model(model, "convert(streaming=True)")
        if len(model.inputs) != 1 or len(model.inputs[0].shape) != 3:
            raise ValueError(
                "streaming=True needs a model with one input of shape (batch, "
                "timesteps, features). Received: inputs "
                f"{[tuple(t.shape) for t in model.inputs]}."
            )
        self.model = graph.as_functional(model)
        self.timesteps = self.model.inputs[0].shape[1]
        self.frame_shape = tuple(self.model.inputs[0].shape[2:])
        self.layers, self._states, self._recurrent_layers = [], _States(), []
        self._framed = set()  # ids of the clone's tensors that still have time
        frame = keras.Input(batch_shape=(1, *self.frame_shape), name="frame")
        self._framed.add(id(frame))
        self.step_model = keras.models.clone_model(
            self.model,
            input_tensors=frame,
            clone_function=lambda layer: layer,
            call_function=self._call,
        )
        if not self.layers:
            raise ValueError(
                "streaming=True needs an LSTM, GRU or SimpleRNN layer in the "
                f"model; {model.name!r} has none."
            )
        outputs = self.step_model.outputs
        self.sequence_output = id(outputs[0]) in self._framed
        fused = all(map(_fusable, self._recurrent_layers))
        self.form = "fused" if fused else "variables"
        self._values = [(v, np.asarray(v)) for v in self.model.variables]
        self._lowered = None
        self.function = tf.function(
            self._step,
            input_signature=[tf.TensorSpec((1, *self.frame_shape), tf.float32)],
            autograph=False,
        )

    def _call(self, layer, *args, **kwargs):
        inputs = args[0] if args else kwargs.get("inputs")
        flat = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        framed = any(id(t) in self._framed for t in flat)
        if type(layer).__name__ == "Bidirectional":
            raise ValueError(
                f"Layer {layer.name!r} (Bidirectional) reads each sequence "
                "backwards too (go_backwards=True), so it needs future frames: a "
                "streaming model cannot run it. Use a forward recurrent layer, or "
                "convert without streaming."
            )
        if isinstance(layer, _rnn_types()):
            out = self._recurrent(layer, flat[0], framed)
        else:
            kwargs.pop("mask", None)
            if framed and type(layer).__name__ == "TimeDistributed":
                layer = layer.layer
            elif framed and type(layer).__name__ not in _PER_FRAME:
                raise ValueError(
                    f"streaming=True runs the model one frame at a time, but layer "
                    f"{layer.name!r} ({type(layer).__name__}) acts on the time axis "
                    "before the last recurrent layer has consumed it. Layers there "
                    "must map each frame alone (Dense, activations, "
                    "normalisation, TimeDistributed, element-wise merges); move "
                    "the layer after a return_sequences=False recurrent layer, or "
                    "convert without streaming."
                )
            out = layer(*args, **kwargs)
        if framed and not (
            isinstance(layer, _rnn_types()) and not layer.return_sequences
        ):
            for t in out if isinstance(out, (list, tuple)) else [out]:
                self._framed.add(id(t))
        return out

    def _recurrent(self, layer, x, framed):
        import tensorflow as tf

        name = f"Layer {layer.name!r} ({type(layer).__name__})"
        if not framed:
            raise ValueError(
                f"{name} receives no time axis in the streaming model (an earlier "
                "recurrent layer has return_sequences=False)."
            )
        if layer.go_backwards or layer.return_state:
            raise ValueError(
                f"{name} has go_backwards={layer.go_backwards}, return_state="
                f"{layer.return_state}: a streaming model sees each frame once, in "
                "order, and returns one output. Use forward layers without "
                "return_state (Bidirectional layers need future frames), or "
                "convert without streaming."
            )
        sizes = layer.cell.state_size
        sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
        states = [
            tf.Variable(
                tf.zeros((1, int(size))), trainable=False, name=f"{layer.name}_{i}"
            )
            for i, size in enumerate(sizes)
        ]
        self._states.variables += states
        self._recurrent_layers.append(layer)
        self.layers.append(
            {"layer": layer.name, "type": type(layer).__name__, "states": len(states)}
        )
        return _StepRecurrent(layer, states)(x)

    def _step(self, frame):
        import keras
        import tensorflow as tf

        mapping = [(v, tf.constant(value)) for v, value in self._values]
        with keras.StatelessScope(state_mapping=mapping):
            return self.step_model(frame, training=False)

    def fused_model(self):
        """The `"fused"` form as a Keras model: input one frame `(1,
        features)`, the model's layers on a one-step time axis (an LSTM then
        lowers to the fused op, whose state persists between invokes), the
        output without the time axis."""
        import keras

        one_step = keras.models.clone_model(
            self.model,
            input_tensors=keras.Input(batch_shape=(1, 1, *self.frame_shape)),
            clone_function=lambda layer: layer,
        )
        frame = keras.Input(batch_shape=(1, *self.frame_shape), name="frame")
        out = one_step(keras.ops.expand_dims(frame, 1))
        if self.sequence_output:
            out = keras.ops.squeeze(out, 1)
        return keras.Model(frame, out, name=f"{self.model.name}_step")

    def lowered(self):
        """`(model, rows)`: `fused_model()` with each LSTM replaced by the
        fused op's interface (`recurrent.lower`; computed once)."""
        from keras_microtune.export import recurrent

        if self._lowered is None:
            self._lowered = recurrent.lower(self.fused_model())
        return self._lowered

    def reset(self):
        """Zero the recurrent state (what `MicroInterpreter::Reset()` does)."""
        for v in self._states.variables:
            v.assign(np.zeros(v.shape, "float32"))

    def run(self, sequences: np.ndarray) -> np.ndarray:
        """Float outputs after each frame: `(N, timesteps, *output)`."""
        out = []
        for sequence in sequences:
            self.reset()
            out.append([np.asarray(self.function(f[None])) for f in sequence])
        self.reset()
        return np.stack([np.concatenate(steps) for steps in out])

    def module(self):
        """A `tf.Module` holding the state variables and the step function."""
        import tensorflow as tf

        module = tf.Module()
        module.states = list(self._states.variables)
        module.step = self.function
        return module

    def describe(self) -> dict:
        return {
            "layers": self.layers,
            "frame_shape": list(self.frame_shape),
            "timesteps": self.timesteps,
            "state_tensors": len(self._states.variables),
            "state_variables": len(self._states.variables)
            if self.form == "variables"
            else 0,
            "sequence_output": self.sequence_output,
            "form": self.form,
            "state": STATE[self.form],
        }


def _fusable(layer) -> bool:
    from keras_microtune.export import recurrent

    return not layer.unroll and recurrent.fusable(layer)  # A forward LSTM.


def _step_layer_class():
    import keras

    class StepRecurrent(keras.layers.Layer):
        """One step of a recurrent layer's cell on its state variables."""

        def __init__(self, layer, states, **kwargs):
            super().__init__(name=f"{layer.name}_step", **kwargs)
            self.cell = layer.cell
            self.units = layer.cell.units
            self._holder = _States()
            self._holder.variables = states

        def call(self, x):
            states = [v.read_value() for v in self._holder.variables]
            out, new = self.cell(x, states if len(states) > 1 else states[0])
            new = list(new) if isinstance(new, (list, tuple)) else [new]
            for v, value in zip(self._holder.variables, new):
                v.assign(value)
            return out

        def compute_output_shape(self, input_shape):
            return (input_shape[0], self.units)

    return StepRecurrent


def _StepRecurrent(layer, states):  # noqa: N802 - builds the layer class lazily.
    return _step_layer_class()(layer, states)


# Frames the converter calibrates on, at most: whole sequences, picked evenly
# over the data (the first ones alone may all be one class, whose ranges
# then clip the others; seen on BasicMotions).
MAX_CALIBRATION_FRAMES = 10_000


def calibration_sequences(step: StepModel, n: int) -> np.ndarray:
    """Indices of the `n` representative sequences calibration feeds."""
    k = min(n, max(1, MAX_CALIBRATION_FRAMES // max(1, step.timesteps)))
    return np.unique(np.linspace(0, n - 1, k).round().astype("int64"))


def trace(step: StepModel):
    """The concrete function TFLite converts: the `"fused"` form traced with
    its weights as constants (`recurrent` explains why), else the step
    function on the state variables."""
    from keras_microtune.export import _model

    if step.form == "variables":
        return step.function.get_concrete_function()
    model, _ = step.lowered()
    return _model.trace(model, [(step.frame_shape, "float32")], constants=True)


def convert(step: StepModel, concrete, rep, target) -> bytes:
    """The step model (`concrete`, from `trace`) -> a `.tflite`.

    Calibration feeds the representative sequences (`calibration_sequences`)
    frame by frame, in order: the converter's calibrator invokes one
    interpreter throughout, so the state carries from frame to frame as on
    the device (and from one sequence's end into the next's start, which it
    cannot reset; the ranges are those of the same states).
    """
    import tensorflow as tf

    if step.form == "fused":
        conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf.Module())
    else:
        conv = tf.lite.TFLiteConverter.from_concrete_functions(
            [concrete], step.module()
        )
        conv.experimental_enable_resource_variables = True
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if target.quantization == "int8":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        sequences = rep[0][calibration_sequences(step, len(rep[0]))]

        def frames():
            for sequence in sequences:
                for frame in sequence:
                    yield [frame[None].astype("float32")]

        conv.representative_dataset = frames
        if target.io_dtype == "int8":
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
    elif target.quantization == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif target.quantization == "dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    return conv.convert()
