"""Checking a `mobile-trainable` file in LiteRT's signature runners.

`signature_ops` lists each signature's builtin ops; `check_step` runs one
`train` step, `infer` and a `set_weights`/`get_weights` round trip against
the same step in Keras (`measurements.training_parity` calls it).
"""

from __future__ import annotations

from keras_microtune.export import trainable

# One exported step against the same step in Keras (float32, other kernels).
LOSS_RTOL = 1e-4
WEIGHT_RTOL = 1e-4


def signature_ops(tflite: bytes) -> dict[str, dict[str, int]]:
    """Builtin op counts of each signature's subgraph, by signature name."""
    from keras_microtune.export import _tflite

    schema, names = _tflite._schema(), _tflite.op_names()
    model = schema.Model.GetRootAs(tflite, 0)
    codes = [
        max(
            model.OperatorCodes(i).BuiltinCode(),
            model.OperatorCodes(i).DeprecatedBuiltinCode(),
        )
        for i in range(model.OperatorCodesLength())
    ]
    out = {}
    for i in range(model.SignatureDefsLength()):
        signature = model.SignatureDefs(i)
        sub = model.Subgraphs(signature.SubgraphIndex())
        counts = {}
        for k in range(sub.OperatorsLength()):
            name = names.get(codes[sub.Operators(k).OpcodeIndex()], "CUSTOM")
            counts[name] = counts.get(name, 0) + 1
        out[signature.SignatureKey().decode()] = dict(sorted(counts.items()))
    return out


def check_step(p, tflite: bytes, x, y) -> dict:
    """Run `infer`, `train` (one step), `get_weights` and `set_weights` in
    LiteRT's signature runners and compare with Keras on the same batch.

    The Keras reference step runs on copies of the variables with a fresh
    copy of the optimizer: the model passed to `convert` is not changed.

    Returns:
        dict: `loss` (LiteRT) and `loss_abs_error`, `weights_max_abs_error`
        after the step, `infer_max_abs_error`, `set_get_round_trip_exact`,
        `within_tolerance`.
    """
    import keras
    import numpy as np
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    model, variables, names = p["model"], p["variables"], p["names"]
    interp = Interpreter(model_content=bytes(tflite))
    run = {name: interp.get_signature_runner(name) for name in trainable.SIGNATURES}
    infer_error = float(
        np.max(
            np.abs(
                run["infer"](x=x)["output"]
                - keras.ops.convert_to_numpy(model(x, training=False))
            )
        )
    )
    before = run["get_weights"]()
    loss = float(run["train"](x=x, y=y)["loss"])
    after = run["get_weights"]()

    loss_fn = p["loss"]
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        reference_loss = loss_fn(y, y_pred)
        if model.losses:
            reference_loss = reference_loss + tf.add_n(model.losses)
    grads = tape.gradient(reference_loss, [v.value for v in variables])
    copies = [keras.Variable(keras.ops.convert_to_numpy(v)) for v in variables]
    optimizer = type(p["optimizer"]).from_config(p["optimizer"].get_config())
    optimizer.build(copies)
    optimizer.apply(grads, copies)
    weight_error = max(
        float(np.max(np.abs(after[n] - keras.ops.convert_to_numpy(v)), initial=0.0))
        for n, v in zip(names, copies)
    )
    scale = max(float(np.max(np.abs(after[n]), initial=0.0)) for n in names)
    run["set_weights"](**before)
    restored = run["get_weights"]()
    exact = all(np.array_equal(restored[n], before[n]) for n in names)
    loss_error = abs(loss - float(reference_loss))
    within = (
        loss_error <= LOSS_RTOL * max(1.0, abs(loss))
        and weight_error <= WEIGHT_RTOL * max(1.0, scale)
        and exact
    )
    return {
        "steps": 1,
        "samples": int(len(x)),
        "loss": loss,
        "loss_abs_error": loss_error,
        "weights_max_abs_error": weight_error,
        "infer_max_abs_error": infer_error,
        "set_get_round_trip_exact": bool(exact),
        "within_tolerance": bool(within),
    }
