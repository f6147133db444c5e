"""Where plain PTQ int8 hurts: every int8 path, scored in TFLite Micro.

Four trained models on bundled data (the autoencoder's rows come from
`benchmarks/ptq_autoencoder.py`, scored by anomaly AUC):

- wine: scikit-learn's wine (13 chemical features in their own units, from
  hue, about 0.5-1.7, to proline, about 300-1700; 3 cultivars; 106 train /
  72 test), a `Normalization` layer first (per feature), Dense 16 -> 3. A
  device feeds raw measurements; one int8 scale for all raw features leaves
  the narrow ones a few levels or none, which is where plain PTQ loses;

- mobilenetv3: `keras.applications.MobileNetV3Small(alpha=0.5)` (hard-swish,
  squeeze-excite; random init) on scikit-learn's digits resized to 32x32x3
  (1437 train / 360 test);
- transformer: the one-block tiny transformer of `examples/tiny_transformer.py`
  (MultiHeadAttention, LayerNormalization, GELU feed-forward; width 16) on
  aeon's bundled ItalyPowerDemand (24 hourly loads, 2 classes; 67 train /
  1029 test: one sample is 0.1 points), each step with its position in
  [-1, 1] as a second channel (`with_position`: without it attention and
  average pooling see only the set of loads, not their order, and the float
  model stays at 67%). On BasicMotions (table 8) every int8
  path scores 100% on its 40 test sequences: nothing to tell apart.

Rows, each converted model run in the TFLite Micro interpreter on the test
set (`kmt.evaluate(..., runtime="tflm")`):

- float: `kmt.convert(model, "float32")`;
- Keras LiteRT PTQ: Keras' own `model.export(format="litert",
  optimizations=[DEFAULT], representative_dataset=...)` (its defaults:
  float input/output, SELECT_TF_OPS allowed);
- TFLiteConverter PTQ: plain `tf.lite.TFLiteConverter`, full int8
  (TFLITE_BUILTINS_INT8, int8 input/output);
- ours PTQ: `kmt.convert(model, "mcu", representative_data=...)`;
- ours QAT: `kmt.optimize.quantize_model(model, unsupported="float")`
  (LayerNormalization trains through the int8 form TFLite Micro runs,
  `QuantizeLayerNorm`; the layers it has no QAT wrapper for, hard-swish
  `Activation` and MultiHeadAttention, keep float weights with their
  outputs fake-quantized), fine-tuned, then `kmt.convert(..., "mcu")`;
- ours auto: `kmt.convert(..., precision="auto")` (int16x8 / float32 for
  the most sensitive layers, within 10% more flash);
- tfmot QAT: `tfmot.quantization.keras.quantize_model` on the tf_keras twin,
  where tfmot accepts the layers (otherwise the row says why not).

Calibration data (and the per-layer error `precision="auto"` steers by) is
training data only. A cell that cannot be produced says why (converter or
TFLite Micro error). Each model is trained with 2 (mobilenetv3) or 3
(transformer) seeds, `--seeds N` for N each: mean ± standard deviation over
seeds.

    python -m benchmarks.quantization [--tiny] [--seeds N] [--tasks ...]
"""

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

ROWS = (
    "float",
    "Keras LiteRT PTQ",
    "TFLiteConverter PTQ",
    "ours PTQ",
    "ours QAT",
    'ours precision="auto"',
    "tfmot QAT",
)


def _digits32(tiny):
    import tensorflow as tf
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    x = tf.image.resize(np.repeat(x, 3, -1), (32, 32)).numpy()
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    if tiny:
        return x_train[:128], y_train[:128], x_test[:32], y_test[:32]
    return x_train, y_train.astype("int32"), x_test, y_test.astype("int32")


def with_position(x):
    """`x` (samples, steps, channels) with the step's position in [-1, 1]
    as one more channel: attention and average pooling are blind to order,
    so without it the transformer sees only the set of loads (67% float)."""
    steps = np.linspace(-1.0, 1.0, x.shape[1], dtype="float32")[None, :, None]
    return np.concatenate([x, np.broadcast_to(steps, (*x.shape[:2], 1))], axis=-1)


def _italy(tiny):
    from benchmarks.transfer_tasks import _ucr

    x, y = _ucr("ItalyPowerDemand", "train", 24)
    xt, yt = _ucr("ItalyPowerDemand", "test", 24)
    x, xt = with_position(x), with_position(xt)
    if tiny:
        return x, y, xt[:32], yt[:32]
    return x, y, xt, yt


def _mobilenetv3(lib, shape, classes):
    base = lib.applications.MobileNetV3Small(
        weights=None,
        input_shape=shape,
        include_top=False,
        include_preprocessing=False,
        alpha=0.5,
        pooling="avg",
    )
    for layer in base.layers:
        if isinstance(layer, lib.layers.BatchNormalization):
            # Keras' 0.999 leaves the moving statistics far from the data
            # after a few hundred steps: the float model then scores chance.
            layer.momentum = 0.9
    out = lib.layers.Dense(classes, activation="softmax", name="head")(base.output)
    return lib.Model(base.input, out, name="mobilenetv3")


def _transformer(lib, shape, classes, width=16, heads=2):
    if lib.__name__ == "keras":
        from examples.tiny_transformer import tiny_transformer

        return tiny_transformer(shape, classes, width=width, heads=heads)
    # The same block in tf_keras, only to ask tfmot whether it accepts it.
    L = lib.layers
    inputs = lib.Input(shape)
    x = L.Dense(width)(inputs)
    a = L.MultiHeadAttention(heads, width // heads)(x, x)
    x = L.LayerNormalization()(L.Add()([x, a]))
    f = L.Dense(width, activation="gelu")(L.Dense(2 * width)(x))
    x = L.LayerNormalization()(L.Add()([x, f]))
    x = L.GlobalAveragePooling1D()(x)
    return lib.Model(inputs, L.Dense(classes, activation="softmax")(x))


def _wine(tiny):
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    x, y = load_wine(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype("float32"),
        y.astype("int32"),
        test_size=0.4,
        random_state=0,
        stratify=y,
    )
    if tiny:
        return x_train, y_train, x_test[:32], y_test[:32]
    return x_train, y_train, x_test, y_test


def _tabular(lib, shape, classes):
    """Normalization (the train set's per-feature statistics) -> Dense 16 ->
    softmax, in Keras or tf_keras."""
    x = _wine(False)[0]
    L = lib.layers
    inputs = lib.Input(shape)
    h = L.Normalization(mean=x.mean(0), variance=x.var(0))(inputs)
    h = L.Dense(16, activation="relu")(h)
    return lib.Model(inputs, L.Dense(classes, activation="softmax")(h), name="wine")


# name: (data loader, builder, (learning rate, epochs, batch), QAT epochs,
# seeds by default).
TASKS = {
    "wine": (_wine, _tabular, (1e-2, 60, 16), 10, 3),
    "mobilenetv3": (_digits32, _mobilenetv3, (3e-3, 12, 32), 3, 2),
    "transformer": (_italy, _transformer, (3e-3, 200, 16), 30, 3),
}


def _fit(model, x, y, rate, epochs, batch):
    import keras

    model.compile(keras.optimizers.Adam(rate), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=batch, verbose=0)
    return model


def _representative(calib):
    return lambda: ([sample[None]] for sample in calib)


def keras_litert(model, calib):
    """Keras' own `model.export(format="litert")` PTQ, calibrated on `calib`."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.tflite")
        model.export(
            path,
            format="litert",
            verbose=False,
            optimizations=[tf.lite.Optimize.DEFAULT],
            representative_dataset=_representative(calib),
        )
        with open(path, "rb") as f:
            return f.read()


def plain_converter(model, calib):
    """Plain `tf.lite.TFLiteConverter` full int8, on a batch-1 function."""
    from benchmarks.conversion import plain_convert

    return plain_convert(model, calib, fixed_batch=True)


def why(error):
    """One short line: the op TFLite Micro lacks, or the layer refused."""
    import re

    text = " ".join(str(error).split())
    op = re.search(r"Didn't find op for builtin opcode '(\w+)'", text)
    if op:
        return f"no TFLite Micro kernel for {op.group(1)}"
    layer = re.search(r"Layer [\w/]+:<class '[\w.]*\.(\w+)'> is not supported", text)
    if layer:
        return f"{layer.group(1)} is not supported"
    called = re.search(r'calling layer "[^"]*" \(type (\w+)\)', text)
    if called:
        return f"{type(error).__name__} in a {called.group(1)} layer"
    return f"{type(error).__name__}: {text[:100]}"


def _tfmot(builder, shape, classes, model, x, y, fit, qat_epochs):
    """tfmot QAT on the tf_keras twin, fine-tuned like ours; else why not."""
    import tf_keras

    from keras_microtune.optimize import tfmot_bridge

    twin = builder(tf_keras, shape, classes)
    try:
        qat = tfmot_bridge.quantize_model(twin)
    except Exception as error:  # tfmot names the layer it has no config for
        return None, "unsupported: " + why(error)
    twin.set_weights(model.get_weights())
    qat = tfmot_bridge.quantize_model(twin)
    rate, _, batch = fit
    qat.compile(tf_keras.optimizers.Adam(rate / 6), "sparse_categorical_crossentropy")
    qat.fit(x, y, epochs=qat_epochs, batch_size=batch, verbose=0)
    return plain_converter(qat, x[:200]), None


def run_task(name, seed, tiny):
    import keras

    import keras_microtune as kmt

    load, builder, fit, qat_epochs, _ = TASKS[name]
    x, y, xt, yt = load(tiny)
    classes = int(max(y.max(), yt.max()) + 1)
    rate, epochs, batch = fit
    if tiny:
        epochs, qat_epochs = 1, 1
    keras.utils.set_random_seed(seed)
    model = _fit(builder(keras, x.shape[1:], classes), x, y, rate, epochs, batch)
    calib = x[:200]
    cells = {}  # row -> (accuracy %, flatbuffer bytes) or (None, why)

    def score(row, make):
        try:
            made = make()
        except Exception as error:  # the row reports why it has no number
            cells[row] = (None, why(error))
            return None
        if isinstance(made, tuple):
            made, reason = made
            if made is None:
                cells[row] = (None, reason)
                return None
        tflite = made.tflite if hasattr(made, "tflite") else made
        try:
            acc = kmt.evaluate(tflite, xt, yt, runtime="tflm")["accuracy"]
        except Exception as error:
            cells[row] = (None, "does not run in TFLite Micro: " + why(error))
            return made
        cells[row] = (100 * acc, len(tflite), None)
        return made

    score("float", lambda: kmt.convert(model, "float32", verbose=0))
    if cells["float"][0] is None:
        # The float .tflite keeps ops TFLite Micro has no float kernel for
        # (GELU): the reference is then the Keras model itself.
        acc = kmt.evaluate(model, xt, yt)["accuracy"]
        cells["float"] = (100 * acc, None, "Keras; float .tflite " + cells["float"][1])
    score("Keras LiteRT PTQ", lambda: keras_litert(model, calib))
    score("TFLiteConverter PTQ", lambda: plain_converter(model, calib))
    ptq = score("ours PTQ", lambda: kmt.convert(model, "mcu", calib, verbose=0))

    def qat():
        wrapped = kmt.optimize.quantize_model(model, unsupported="float")
        _fit(wrapped, x, y, rate / 6, qat_epochs, batch)
        return kmt.convert(kmt.optimize.strip(wrapped), "mcu", calib, verbose=0)

    score("ours QAT", qat)
    auto = score(
        'ours precision="auto"',
        lambda: kmt.convert(model, "mcu", calib, precision="auto", verbose=0),
    )
    score(
        "tfmot QAT",
        lambda: _tfmot(builder, x.shape[1:], classes, model, x, y, fit, qat_epochs),
    )
    raised = {}
    if auto is not None and hasattr(auto, "report"):
        raised = {
            k: v for k, v in (auto.report.get("precision") or {}).items() if v != "int8"
        }
    worst = None
    if ptq is not None and hasattr(ptq, "report") and ptq.report.get("layer_errors"):
        first = ptq.report["layer_errors"][0]
        worst = f"{first['layer']} {first['sqnr_db']:.1f} dB"
    return cells, raised, worst, (len(x), len(xt))


def cell(values):
    """Mean ± std over seeds of `(value, ...)` cells, or the first reason."""
    numbers = [v[0] for v in values if v[0] is not None]
    if len(numbers) < len(values):
        return next(v[1] for v in values if v[0] is None)
    text = f"{numbers[0]:.2f}"
    if len(numbers) > 1:
        text = f"{np.mean(numbers):.2f} ± {np.std(numbers):.2f}"
    notes = sorted({v[2] for v in values if len(v) > 2 and v[2]})
    return text + "".join(f" ({note})" for note in notes)


def print_rows(name, cells, metric, runs):
    """Table 3's rows for one model: `cells` is {row: [per-seed cell]},
    `metric` the score column's label, `runs` each seed's
    `(cells, raised, worst layer, ...)`."""
    base = cells["float"]
    ptq_sizes = [c[1] for c in cells["ours PTQ"] if c[0] is not None]
    print(f"| model | row | {metric} | vs float (pt) | flatbuffer (B) |")
    print("|---|---|---|---|---|")
    for row in ROWS:
        values = cells[row]
        delta, size = "-", "-"
        if all(v[0] is not None for v in values + base):
            delta = f"{np.mean([v[0] - f[0] for v, f in zip(values, base)]):+.2f}"
        if all(v[0] is not None and v[1] for v in values):
            mean_size = np.mean([v[1] for v in values])
            size = f"{int(mean_size):,}"
            if row == 'ours precision="auto"' and ptq_sizes:
                size += f" ({mean_size / np.mean(ptq_sizes):.2f}x ours PTQ)"
        print(f"| {name} | {row} | {cell(values)} | {delta} | {size} |")
    for seed, run in enumerate(runs):
        print(
            f"seed {seed}: worst ours-PTQ layer {run[2]}; "
            f'precision="auto" raised {run[1] or "nothing"}'
        )


def size_ratio(cells):
    sizes = [
        a[1] / p[1]
        for a, p in zip(cells['ours precision="auto"'], cells["ours PTQ"])
        if a[0] is not None and p[0] is not None
    ]
    return float(np.mean(sizes)) if sizes else None


def _summary(cells):
    summary = {}
    for row in ROWS:
        values = cells[row]
        ok = all(v[0] is not None for v in values)
        summary[row] = [v[0] for v in values] if ok else None
    summary["auto size"] = size_ratio(cells)
    return summary


def reading(summary):
    """Targets met or not, per model, from the mean over seeds."""
    parts = []
    for name, rows in summary.items():
        mean = {k: float(np.mean(v)) for k, v in rows.items() if isinstance(v, list)}
        float_acc, ptq = mean["float"], mean.get("ours PTQ")
        if ptq is None:
            parts.append(f"{name}: ours PTQ failed")
            continue
        gap = float_acc - ptq
        text = f"{name}: ours PTQ {-gap:+.2f} pt vs float"
        plain = [
            f"{row} {mean[row] - float_acc:+.2f}"
            for row in ("TFLiteConverter PTQ", "Keras LiteRT PTQ")
            if row in mean
        ]
        if plain:
            text += f" ({', '.join(plain)})"
        if "ours QAT" in mean:
            qat = mean["ours QAT"] - float_acc
            met = "met" if qat >= -0.3 else f"NOT met, by {-0.3 - qat:.2f} pt"
            text += f"; QAT {qat:+.2f} pt (target >= -0.3: {met})"
        else:
            text += "; QAT did not run (target not met)"
        auto = mean.get('ours precision="auto"')
        if auto is None:
            text += '; precision="auto" did not run'
        elif gap <= 0:
            text += '; no PTQ gap for precision="auto" to recover'
        else:
            share = (auto - ptq) / gap
            size = rows["auto size"]
            met = "met" if share >= 0.8 and size <= 1.10 else "NOT met"
            text += (
                f'; precision="auto" recovers {100 * share:.0f}% of the '
                f"{gap:.2f}-pt gap at "
                f"{size:.2f}x flash (target >= 80% at <= 1.10x: {met})"
            )
        parts.append(text)
    return ". ".join(parts) + ". " + CONTEXT


CONTEXT = (
    "Accuracies (the autoencoder: anomaly AUC, in points) are means over "
    "seeds of each model's own TFLite Micro run; "
    "'vs float' is against the same seed's float model (the Keras model where "
    "the float .tflite has an op TFLite Micro lacks). Keras' own LiteRT export "
    "and the plain TFLiteConverter keep ops TFLite Micro has no kernel for "
    "(GELU; the first one it meets in Keras' export is a REDUCE_PROD), so "
    "their transformers do not run in TFLite Micro; `kmt.convert`'s does (it "
    "lowers GELU before converting). The transformer reads each step's "
    "position as a second input channel (without it, attention and average "
    "pooling see only the set of 24 loads and the float model stays near "
    "67%). Our QAT wraps Dense/Conv/pooling/Add and LayerNormalization "
    "(`QuantizeLayerNorm`: fake quantizers on the int8 mean, deviation, "
    "L2_NORMALIZATION and scaled tensors TFLite Micro computes) but leaves "
    "MultiHeadAttention and hard-swish `Activation` in float with only their "
    "outputs fake-quantized (`unsupported='float'`). A LayerNorm divides by "
    "each token's own spread, so it magnifies one-step roundings of its int8 "
    "input: the worst ours-PTQ layer is a LayerNorm, and precision='auto' can "
    "only make it float32 (TFLite Micro's L2_NORMALIZATION has no int16 "
    "kernel), which does not undo the rounding of its int8 input. tfmot "
    "rejects MultiHeadAttention, and tf_keras' "
    "MobileNetV3 builds hard-swish from TFOpLambda ops (x + 3) that tfmot "
    "cannot wrap. The digits MobileNetV3 loses nothing to PTQ (360 test "
    "images, one is 0.28 points): per-channel int8 PTQ is already enough there."
)


ALL_TASKS = (*TASKS, "autoencoder")


def main(tiny=False, seeds=None, tasks=ALL_TASKS, json_path=None):
    results, summary = {}, {}
    for name in tasks:
        if name == "autoencoder":  # Its own script: benchmarks/ptq_autoencoder.py
            from benchmarks import ptq_autoencoder

            print()
            argv = ["--tiny"] if tiny else [f"--seeds={seeds}"] if seeds else []
            summary[name] = _summary(ptq_autoencoder.main(argv))
            continue
        n_seeds = 1 if tiny else seeds or TASKS[name][-1]
        runs = [run_task(name, seed, tiny) for seed in range(n_seeds)]
        results[name] = runs
        cells = {row: [run[0][row] for run in runs] for row in ROWS}
        train, test = runs[0][3]
        print(
            f"\n{name}: {train} train / {test} test, {n_seeds} seed(s), "
            "accuracy (%) in TFLite Micro"
        )
        print_rows(name, cells, "accuracy (%)", runs)
        summary[name] = _summary(cells)
    read = reading(summary)
    if not json_path:  # `run_all` prints the reading under the table itself.
        print(f"\n{read}")
    if json_path:
        import json

        with open(json_path, "w") as f:
            json.dump({"summary": summary, "reading": read}, f)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="fast smoke run")
    parser.add_argument("--seeds", type=int, help="seeds per model (default: 2, 3)")
    parser.add_argument(
        "--tasks", nargs="+", default=list(ALL_TASKS), choices=list(ALL_TASKS)
    )
    parser.add_argument("--json", help="also write the summary and reading here")
    args = parser.parse_args()
    main(args.tiny, args.seeds, args.tasks, args.json)
