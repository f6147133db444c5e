"""Recurrent layers for int8 and TFLite Micro targets, lowered before tracing.

A Keras 3 `LSTM`/`GRU`/`SimpleRNN` (default `unroll=False`) traces to a
TensorFlow `While` loop, which TFLite Micro cannot run and TFLite's int8
converter crashes on. `lower(model)` returns a copy in which each such layer
(and each `Bidirectional` wrapping one) is replaced:

- `"fused"`: an LSTM with the standard activations (tanh, sigmoid) and a bias
  becomes `FusedLSTM`, which calls the layer's own weights through a
  `tf.function` carrying TensorFlow's Keras-LSTM interface attributes
  (`api_implements="lstm_..."`, `time_major`, `go_backwards`). TFLite's
  converter replaces such a function with one int8
  `UNIDIRECTIONAL_SEQUENCE_LSTM` op (16-bit cell state) that TFLite Micro
  runs. The converter only keeps the attributes on its SavedModel import
  path, so such a model is traced with its weights as constants
  (`_model.trace(..., constants=True)`) and converted on that path.
- `"unrolled"`: every other recurrent layer (GRU, SimpleRNN, LSTM with other
  activations, `return_state=True`) is cloned with `unroll=True` and the same
  weights: one FULLY_CONNECTED/ADD/MUL/LOGISTIC/TANH step per time step.

Masks (a `Masking` layer, `Embedding(mask_zero=True)`), `stateful=True` and an
unknown sequence length are refused with what to do instead.
"""

from __future__ import annotations

import uuid

import keras

from keras_microtune.optimize import graph

LOWERINGS = ("fused", "unrolled")


def _rnn_types():
    return (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)


def is_recurrent(layer) -> bool:
    """True for a looping Keras recurrent layer (or a Bidirectional of one)."""
    inner = _inner_layers(layer)
    return bool(inner) and not all(getattr(rnn, "unroll", False) for rnn in inner)


def _inner_layers(layer) -> list:
    if isinstance(layer, keras.layers.Bidirectional):
        return [layer.forward_layer, layer.backward_layer]
    if isinstance(layer, _rnn_types()):
        return [layer]
    return []


def fusable(layer) -> bool:
    """True when TFLite's fused LSTM op computes exactly what `layer` does."""
    inner = _inner_layers(layer)
    return bool(inner) and all(
        isinstance(rnn, keras.layers.LSTM)
        and rnn.cell.activation is keras.activations.tanh
        and rnn.cell.recurrent_activation is keras.activations.sigmoid
        and rnn.cell.use_bias
        and not rnn.return_state
        for rnn in inner
    )


def lower(model, fuse: bool = True):
    """A copy of `model` whose recurrent layers TFLite Micro can run.

    Args:
        model: keras.Model. Functional or Sequential (nested models included).
        fuse: bool. Lower eligible LSTMs to the fused op; `False` unrolls all.
            Defaults to `True`.

    Returns:
        `(model, rows)`: the rewritten model (`model` itself when it holds no
        looping recurrent layer) and one row per lowered layer:
        `{"layer", "type", "lowering", "ops", "timesteps", "units"}`.

    Raises:
        ValueError: a recurrent layer receives a mask, is stateful, or its
            sequence length is unknown.
    """
    recurrent = [layer for layer in graph.walk(model) if is_recurrent(layer)]
    if not recurrent:
        return model, []
    _check_no_masks(model, recurrent)
    rows = []

    def replace(layer, x):
        if not is_recurrent(layer):
            return layer
        _check_layer(layer, x)
        fused = fuse and fusable(layer)
        rows.append(_row(layer, x, "fused" if fused else "unrolled"))
        return FusedLSTM(layer) if fused else unrolled_copy(layer, x.shape)

    return graph.rewrite(model, replace), rows


def _row(layer, x, lowering):
    rnn = _inner_layers(layer)[0]
    ops = (
        ["UNIDIRECTIONAL_SEQUENCE_LSTM"]
        if lowering == "fused"
        else ["FULLY_CONNECTED", "ADD", "MUL", "LOGISTIC", "TANH"]
    )
    return {
        "layer": layer.name,
        "type": type(layer).__name__
        + (f"({type(rnn).__name__})" if rnn is not layer else ""),
        "lowering": lowering,
        "ops": ops,
        "timesteps": int(x.shape[1]),
        "units": int(rnn.units),
    }


def _check_no_masks(model, recurrent):
    masking = [
        layer.name
        for layer in graph.walk(model)
        if isinstance(layer, keras.layers.Masking)
        or (isinstance(layer, keras.layers.Embedding) and layer.mask_zero)
    ]
    if masking:
        raise ValueError(
            f"Layers {masking} produce a mask for the recurrent layers "
            f"{[layer.name for layer in recurrent]}; TFLite Micro has no masked "
            "recurrent kernel, so the converted model would silently compute "
            "over the padding. Remove the Masking layer (or mask_zero=True) and "
            "pad every sequence to the model's fixed length, or trim the padding "
            "on the device before invoking."
        )


def _check_layer(layer, x):
    names = f"Layer {layer.name!r} ({type(layer).__name__})"
    if len(x.shape) != 3 or x.shape[1] is None:
        raise ValueError(
            f"{names} receives inputs of shape {tuple(x.shape)}; TFLite Micro "
            "needs a fixed sequence length. Build the model with "
            "keras.Input(shape=(timesteps, features)) and pad or crop sequences "
            "to that length."
        )
    if any(rnn.stateful for rnn in _inner_layers(layer)):
        raise ValueError(
            f"{names} is stateful=True, which a converted model cannot keep "
            "between invokes. Convert it with stateful=False, or convert with "
            "kmt.convert(..., streaming=True) to keep the state on the device."
        )


def unrolled_copy(layer, input_shape):
    """`layer` (a recurrent layer or Bidirectional) rebuilt with `unroll=True`
    and the same weights."""
    config = layer.get_config()
    if isinstance(layer, keras.layers.Bidirectional):
        for key in ("layer", "backward_layer"):
            if config.get(key):
                config[key]["config"]["unroll"] = True
    else:
        config["unroll"] = True
    copy = layer.__class__.from_config(config)
    copy.build(input_shape)
    copy.set_weights(layer.get_weights())
    return copy


class FusedLSTM(keras.layers.Layer):
    """An LSTM (or Bidirectional LSTM) as TFLite's fused-LSTM interface.

    Computes exactly what the wrapped layer computes at inference, with its
    variables, through a `tf.function` that TFLite's converter replaces with
    `UNIDIRECTIONAL_SEQUENCE_LSTM`. Conversion-time only (TensorFlow backend);
    `lower()` creates it, and it is never saved.

    Args:
        layer: a built `keras.layers.LSTM` or `Bidirectional(LSTM)` for which
            `fusable(layer)` holds.
    """

    def __init__(self, layer, **kwargs):
        super().__init__(name=layer.name, dtype=layer.dtype_policy, **kwargs)
        if not fusable(layer):
            raise ValueError(
                f"Received an invalid value for `layer`: {layer.name!r} is not an "
                "LSTM with tanh/sigmoid activations, a bias and return_state="
                "False (see `fusable`)."
            )
        self.wrapped = layer
        self._functions = [_lstm_function(rnn) for rnn in _inner_layers(layer)]

    def call(self, x, mask=None, training=None):
        outs = [
            _run(rnn, fn, x)
            for rnn, fn in zip(_inner_layers(self.wrapped), self._functions)
        ]
        if not isinstance(self.wrapped, keras.layers.Bidirectional):
            return outs[0]
        y, y_rev = outs
        if self.wrapped.return_sequences:
            y_rev = keras.ops.flip(y_rev, axis=1)
        mode = self.wrapped.merge_mode
        if mode == "concat":
            return keras.ops.concatenate([y, y_rev], axis=-1)
        if mode == "sum":
            return y + y_rev
        if mode == "ave":
            return (y + y_rev) / 2
        if mode == "mul":
            return y * y_rev
        return (y, y_rev)

    def compute_output_shape(self, input_shape):
        return self.wrapped.compute_output_shape(input_shape)


def _run(rnn, fn, x):
    import tensorflow as tf

    zeros = tf.zeros((tf.shape(x)[0], rnn.units), x.dtype)
    cell = rnn.cell
    last, sequence, _, _, _ = fn(
        x,
        zeros,
        zeros,
        tf.convert_to_tensor(cell.kernel),
        tf.convert_to_tensor(cell.recurrent_kernel),
        tf.convert_to_tensor(cell.bias),
    )
    return sequence if rnn.return_sequences else last


def _lstm_function(rnn):
    """The Keras-LSTM interface function TFLite's converter fuses: arguments
    (inputs, h0, c0, kernel, recurrent kernel, bias), five results (last
    output, sequence, h, c, runtime); gates in Keras' order i, f, c, o."""
    import tensorflow as tf

    def standard_lstm(inputs, init_h, init_c, kernel, recurrent_kernel, bias):
        steps = tf.unstack(inputs, axis=1)
        h, c, outputs = init_h, init_c, []
        for x_t in reversed(steps) if rnn.go_backwards else steps:
            z = tf.matmul(x_t, kernel) + tf.matmul(h, recurrent_kernel) + bias
            i, f, g, o = tf.split(z, 4, axis=1)
            c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
            h = tf.sigmoid(o) * tf.tanh(c)
            outputs.append(h)
        return h, tf.stack(outputs, axis=1), h, c, tf.constant(0.0)

    attributes = {
        "api_implements": f"lstm_{uuid.uuid4()}",
        "time_major": False,
        "go_backwards": bool(rnn.go_backwards),
    }
    return tf.function(
        standard_lstm, autograph=False, experimental_attributes=attributes
    )
