"""A LiteRT model that trains its own adapters: target `"mobile-trainable"`.

The exported `.tflite` has four signatures, all in builtin ops (LiteRT
wheels and Android builds have no Flex delegate):

- `infer(x) -> output`: the model in inference mode, any batch size;
- `train(x, y) -> loss`: one optimizer step on one batch of `batch_size`
  samples (fixed at export): the compiled loss (plus the model's
  regularization losses), its gradient with respect to exactly
  `model.trainable_variables` (what `kmt.attach` made trainable: adapters,
  LoRA factors, chosen biases and norms, the head), and the compiled
  optimizer's update, with its state (moments, step count) kept in
  variables. BatchNorm of the frozen backbone stays in inference mode, as
  in Keras' `fit`. The optimizer starts fresh (zero moments, step 0) with
  the compiled one's configuration and current learning rate;
- `get_weights() -> {name: value}`: one output per trained variable;
- `set_weights(name=value, ...)`: the same names as inputs.

Frozen weights are constants of the file; only trained variables and the
optimizer's state are variables. The gradient is written in builtin ops by
`train_graph.builtin_gradients`.
"""

from __future__ import annotations

import re

SIGNATURES = ("infer", "train", "get_weights", "set_weights")
DEFAULT_BATCH_SIZE = 16
OPTIMIZERS = ("SGD", "Adam")
# Optimizer options the exported step does not reproduce: refused.
_OPTIMIZER_OPTIONS = (
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "gradient_accumulation_steps",
    "loss_scale_factor",
)
_RANDOM_LAYERS = ("Dropout", "SpatialDropout", "GaussianDropout", "GaussianNoise")


def check_batch_size(batch_size) -> int:
    """`batch_size` as a positive int (None: the default, 16)."""
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(
            "Received an invalid value for `train_batch_size`, expected a positive "
            f"integer (the batch the exported train signature takes). "
            f"Received: train_batch_size={batch_size!r}"
        )
    return batch_size


def _fail(message):
    raise ValueError(f"Cannot export a trainable model: {message}")


def _loss(model):
    import keras

    loss = getattr(model, "loss", None)
    if loss is None:
        _fail(
            "the model is not compiled with a loss. Compile it as you would to "
            "fit it, e.g. model.compile(keras.optimizers.Adam(1e-3), "
            "'sparse_categorical_crossentropy'); the train signature uses that "
            "loss and optimizer."
        )
    if isinstance(loss, (list, tuple, dict)):
        _fail(
            "the train signature supports one loss on one output. "
            f"Received: loss={loss!r}"
        )
    fn = keras.losses.get(loss)
    if isinstance(fn, keras.losses.Loss):
        return fn, fn.name
    # A loss function gives per-sample losses; Keras' fit averages them.
    return (lambda y, y_pred: keras.ops.mean(fn(y, y_pred))), fn.__name__


def _optimizer(model):
    import keras

    optimizer = getattr(model, "optimizer", None)
    name = type(optimizer).__name__
    if optimizer is None or type(optimizer) not in (
        keras.optimizers.SGD,
        keras.optimizers.Adam,
    ):
        _fail(
            f"the train signature implements the optimizers {list(OPTIMIZERS)} "
            f"(keras.optimizers.SGD, with or without momentum, and "
            f"keras.optimizers.Adam). Received: optimizer {name}. Compile the "
            "model with one of them."
        )
    config = optimizer.get_config()
    given = {
        k: config.get(k)
        for k in _OPTIMIZER_OPTIONS
        if config.get(k) not in (None, False, 0, 0.0)
    }
    if config.get("amsgrad"):
        given["amsgrad"] = True
    if given:
        _fail(
            f"optimizer options {given} are not reproduced by the exported train "
            f"step. Compile with {name} without them."
        )
    if isinstance(config.get("learning_rate"), dict):
        _fail(
            "the learning rate is a schedule; the exported step uses a constant "
            f"learning rate. Compile with {name}(learning_rate=<float>)."
        )
    config["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    return type(optimizer).from_config(config)


def _check_layers(model):
    import keras

    random = [
        layer.name
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if type(layer).__name__.startswith(_RANDOM_LAYERS)
        and getattr(layer, "rate", getattr(layer, "stddev", 0))
    ]
    if random:
        _fail(
            f"layers {random} are random in training (dropout, noise), which "
            "needs random ops in the train step. Set their rate to 0 (e.g. "
            "OutputStage(dropout=0.0)) or remove them before exporting."
        )
    if not isinstance(model, keras.Model) or len(model.inputs or []) != 1:
        _fail("the model must be a built Keras model with one input.")
    if len(model.outputs) != 1:
        _fail(f"the model must have one output; it has {len(model.outputs)}.")


def signature_names(variables) -> list[str]:
    """A unique, signature-safe name for each variable, from its path."""
    names = []
    for v in variables:
        base = re.sub(r"\W", "_", v.path).strip("_") or "weight"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def plan(model, batch_size) -> dict:
    """Check `model` can be exported trainable; return what the step uses.

    Raises:
        ValueError: not compiled, another optimizer or loss form, random
            layers, nothing trainable, several inputs/outputs.
    """
    import numpy as np

    _check_layers(model)
    (loss, loss_name), optimizer = _loss(model), _optimizer(model)
    variables = list(model.trainable_variables)
    if not variables:
        _fail(
            "the model has no trainable variables. Use kmt.attach(model, ...) "
            "to choose what trains (adapters, head, biases, norms)."
        )
    names = signature_names(variables)
    sparse = "sparse" in loss_name.lower()
    out_shape = tuple(model.outputs[0].shape[1:])
    return {
        "model": model,
        "batch_size": batch_size,
        "loss": loss,
        "optimizer": optimizer,
        "variables": variables,
        "names": names,
        # Sparse losses take one class index per output position.
        "label_shape": out_shape[:-1] if sparse else out_shape,
        "label_dtype": "int32" if sparse else "float32",
        "report": {
            "signatures": list(SIGNATURES),
            "batch_size": batch_size,
            "loss": loss_name,
            "optimizer": {
                "name": type(optimizer).__name__,
                **{
                    k: v
                    for k, v in optimizer.get_config().items()
                    if k
                    in (
                        "learning_rate",
                        "momentum",
                        "nesterov",
                        "beta_1",
                        "beta_2",
                        "epsilon",
                    )
                },
            },
            "labels": {
                "shape": [batch_size, *(out_shape[:-1] if sparse else out_shape)],
                "dtype": "int32" if sparse else "float32",
            },
            "variables": [
                {"name": n, "shape": list(v.shape), "path": v.path}
                for n, v in zip(names, variables)
            ],
            "trained_parameters": int(
                sum(np.prod(v.shape, dtype=np.int64) for v in variables)
            ),
        },
    }


def build_module(p):
    """The `tf.Module` with the four signatures for a `plan` result."""
    import tensorflow as tf

    from keras_microtune.export.train_graph import builtin_gradients

    model, optimizer, loss_fn = p["model"], p["optimizer"], p["loss"]
    variables, names = p["variables"], p["names"]
    optimizer.build(variables)
    in_shape = tuple(model.inputs[0].shape[1:])
    batch = p["batch_size"]
    x_spec = tf.TensorSpec((batch, *in_shape), tf.float32)
    y_spec = tf.TensorSpec((batch, *p["label_shape"]), p["label_dtype"])
    weight_specs = [
        tf.TensorSpec(v.shape, v.dtype, name=n) for n, v in zip(names, variables)
    ]

    class TrainableModel(tf.Module):
        def __init__(self):
            super().__init__(name="keras_microtune_trainable")
            self.model_variables = [v.value for v in model.variables]
            self.optimizer_variables = [v.value for v in optimizer.variables]

        @tf.function(input_signature=[tf.TensorSpec((None, *in_shape), tf.float32)])
        def infer(self, x):
            return {"output": model(x, training=False)}

        @tf.function(input_signature=[x_spec, y_spec])
        def train(self, x, y):
            with builtin_gradients():
                y_pred = model(x, training=True)
                loss = loss_fn(y, y_pred)
                if model.losses:
                    loss = loss + tf.add_n(model.losses)
            grads = tf.gradients(loss, [v.value for v in variables])
            unused = [n for n, g in zip(names, grads) if g is None]
            if unused:
                _fail(
                    f"trainable variables {unused} do not affect the loss (no "
                    "gradient). Freeze them (variable.trainable = False) or "
                    "connect them to the output."
                )
            optimizer.apply(grads, variables)
            return {"loss": loss}

        @tf.function(input_signature=[])
        def get_weights(self):
            return {n: tf.identity(v.value) for n, v in zip(names, variables)}

        @tf.function(input_signature=weight_specs)
        def set_weights(self, *values):
            for v, value in zip(variables, values):
                v.assign(value)
            return {n: tf.identity(v.value) for n, v in zip(names, variables)}

    return TrainableModel()


def to_tflite(module) -> bytes:
    """Convert the module's four signatures to one builtin-op flatbuffer
    (through a temporary SavedModel, as TFLite's on-device training does)."""
    import tempfile

    import tensorflow as tf

    signatures = {
        name: getattr(module, name).get_concrete_function() for name in SIGNATURES
    }
    # The gradients are already in the graph: nothing to save for them.
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    with tempfile.TemporaryDirectory(prefix="kmt_trainable_") as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures, options=options)
        conv = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=list(SIGNATURES)
        )
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        conv.experimental_enable_resource_variables = True
        try:
            return conv.convert()
        except Exception as e:  # ConverterError and friends.
            message = str(e)
    tf_ops = sorted(set(re.findall(r"'tf\.(\w+)'", message)))
    first = next((ln for ln in message.splitlines() if "rror" in ln), message)
    _fail(
        f"its train step needs TensorFlow ops with no builtin TFLite kernel: "
        f"{tf_ops or 'unknown'} (gradients of the layers between the first "
        "trainable variable and the loss). Train only layers after the ones "
        "holding these ops (e.g. kmt.attach(..., lora=..., train_norm=[...]) "
        "on later layers), or replace those layers. Converter said: "
        f"{first.strip()[:300]}"
    )
