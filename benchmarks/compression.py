"""Flash and accuracy of table 1's models with clustering + TFLite Micro LUT.

Every model of table 1 (`benchmarks.zoo`) is converted for TFLite Micro as
plain int8 (per-channel weights: the baseline), and by two clustering routes,
each clustered + clustering-aware fine-tuning + `compression="lut4"`:

- per-channel: `kmt.optimize.cluster_weights` (16 values per output channel),
  per-channel int8 weights, one value table per output channel;
- per-tensor: `kmt.optimize.fold_batch_norm`, then 16 values per kernel
  (`cluster_per_channel=False`), `convert(weight_quantization="per_tensor")`:
  one 16-entry table per kernel and no per-channel scales. Column "route
  int8" scores this route's int8 model without clustering (what per-tensor
  weights alone cost).

The zoo's weights are random, so the classifiers get a real task by
distillation: the clustered copy is fine-tuned to the float model's outputs
on calibration-like data (the zoo's normal inputs), and both int8 models are
scored by top-1 agreement with the float model on held-out inputs, run in
TFLite Micro. Untrained MicroTune adapters (zero residual) stay frozen
(`_freeze_adapters`). The fully-connected autoencoder is trained on
scikit-learn's digits (each 8x8 image tiled to its 640 inputs; digits 0-4
are normal) and scored by anomaly AUC (reconstruction error of held-out
digits 0-4 against 5-9), also in TFLite Micro. The digits transfer CNN
(trained here) is the first row, scored by accuracy. A distilled model keeps
its fine-tuning only if that raised its Keras agreement on validation inputs
(separate from the test inputs); else the row is post-training clustering
("no (val.)").

For each model the table also gives the best per-channel lut4 could do on
its flatbuffer: every compressed kernel stored as 4-bit indices with no value
tables, the rest of the file (biases, per-channel quantization parameters,
activations' metadata, graph) unchanged.

    python -m benchmarks.compression [--tiny]
"""

import argparse
import json
import time

import keras
import numpy as np

import keras_microtune as kmt
from benchmarks import zoo
from keras_microtune.export import compression as compression_lib
from keras_microtune.export import runtimes

TARGET_RATIO = 0.65
TARGET_LOSS = 0.5
MODELS = tuple(zoo.ZOO)


def _digits_model():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2D(64, 3, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(5)(x), name="digits_cnn")


def _fit(model, x, y, epochs, loss, lr=1e-3, batch_size=32):
    model.compile(keras.optimizers.Adam(lr), loss)
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0)
    return model


def _freeze_batchnorm(model):
    """BatchNorm in inference mode: fine-tuning keeps the folded statistics."""
    for layer in kmt.callbacks._base.sublayers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def _freeze_adapters(model):
    """Keep untrained MicroTune adapters (zero residual) out of fine-tuning.

    Table 1's four_stages holds a MicroTune layer at its zero initialisation:
    the converter stores its four group kernels (and biases) as one shared
    all-zero buffer. Fine-tuning the clustered copy trained them into four
    distinct kernels, so the stripped model converted to 20,032 B against the
    plain 16,864 B before any compression (table 6, 2026-12-02 14:19 UTC:
    lut4 1.16x). Clustering fine-tuning is to win back what clustering lost,
    not to train a new adapter, so the adapters stay as they are.
    """
    frozen = 0
    for layer in kmt.callbacks._base.sublayers(model):
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, kmt.layers.MicroTune):
            layer.trainable = False
            frozen += 1
    return frozen


def _tflm_outputs(tflite, x):
    ins, outs = runtimes.io_details(tflite)
    raw = runtimes.tflm_run(tflite, [runtimes.quantize(x, ins[0])], 1 << 21)
    return runtimes.dequantize(raw[0], outs[0])


def _auc(normal, anomalous):
    """Probability that an anomaly scores above a normal sample (ties half)."""
    a, b = np.asarray(anomalous)[:, None], np.asarray(normal)[None, :]
    return float((a > b).mean() + 0.5 * (a == b).mean())


def _weight_floor(result, bits):
    """Flatbuffer bytes if every kernel in `result` were stored as bare
    `bits`-bit indices (no tables, no DECODE): lut's best case."""
    chosen, skipped = compression_lib.plan(result.tflite, "auto")
    weights = sum(e["bytes_before"] for e in chosen + skipped)
    return result.size_bytes - weights * (8 - bits) // 8, weights


def _compressed(result):
    """(tensors compressed, skipped as no smaller, with their bytes)."""
    c = result.report.get("compression", {})
    tensors = c.get("tensors", [])
    skipped = [s for s in c.get("skipped", []) if "no smaller" in s["reason"]]
    return tensors, skipped


# How each model is clustered and quantized before lut4. "per-channel": 16
# values per output channel, per-channel int8 (table 1's quantization).
# "per-tensor": BatchNorm folded first (`kmt.optimize.fold_batch_norm`), 16
# values per kernel, `weight_quantization="per_tensor"`, so every kernel
# needs one 16-entry table and no per-channel scales.
ROUTES = {
    "per-channel": {
        "fold": False,
        "cluster_per_channel": True,
        "weights": "per_channel",
    },
    "per-tensor": {"fold": True, "cluster_per_channel": False, "weights": "per_tensor"},
}


def _convert(model, x_cal, compression=None, weights="per_channel"):
    return kmt.convert(
        model,
        "mcu",
        representative_data=x_cal,
        compression=compression,
        weight_quantization=weights,
        verbose=0,
    )


class Task:
    """A model, its data, how to fine-tune it and how to score it."""

    def __init__(self, name, model, x_cal, fine_tune, score, metric):
        self.name, self.model, self.x_cal = name, model, x_cal
        self.fine_tune, self.score, self.metric = fine_tune, score, metric


def _digits_task(tiny):
    task = kmt.data.load_digits_transfer()
    (xs, ys), (xt, yt), (xv, yv) = task["source"], task["train"], task["test"]
    epochs = 2 if tiny else 20
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _digits_model()
    _fit(model, xs, ys % 5, epochs, loss)
    _fit(model, xt, yt, epochs, loss)

    def fine_tune(clustered):
        _fit(clustered, xt, yt, 1 if tiny else 5, loss, lr=3e-4)
        return True

    def score(tflite):
        return 100 * kmt.evaluate(tflite, xv, yv, runtime="tflm")["accuracy"]

    return Task("digits CNN", model, xt[:200], fine_tune, score, "accuracy")


def _distillation_task(name, train, test, epochs):
    """A zoo classifier distilled from its own float model (random weights)."""
    model, x = zoo.build(name, samples=train)
    rng = np.random.default_rng(1)
    x_val, x_test = (
        rng.normal(size=(n, *x.shape[1:])).astype("float32") for n in (test // 2, test)
    )
    teacher_train = model.predict(x, verbose=0, batch_size=64)
    val_labels, labels = (
        model.predict(v, verbose=0, batch_size=64).argmax(-1) for v in (x_val, x_test)
    )

    def agreement(m):
        return (
            m.predict(x_val, verbose=0, batch_size=64).argmax(-1) == val_labels
        ).mean()

    def fine_tune(clustered):
        _freeze_batchnorm(clustered)
        _freeze_adapters(clustered)
        before, weights = agreement(clustered), clustered.get_weights()
        # A random model's softmax outputs are near-uniform and 512 inputs
        # are few: a small learning rate, else the student overfits them
        # (1e-3 lost 25 pt of held-out agreement on ds_cnn).
        _fit(clustered, x, teacher_train, epochs, keras.losses.KLDivergence(), 3e-5)
        if agreement(clustered) < before:  # Chosen on validation inputs.
            clustered.set_weights(weights)
            return False
        return True

    def score(tflite):
        return 100 * kmt.evaluate(tflite, x_test, labels, runtime="tflm")["accuracy"]

    return Task(name, model, x[:64], fine_tune, score, "agreement with float")


def _autoencoder_task(tiny):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.tile((digits.data / 16.0).astype("float32"), (1, 10))  # 64 -> 640
    normal = digits.target < 5
    rng = np.random.default_rng(0)
    order = rng.permutation(int(normal.sum()))
    x_normal = x[normal][order]
    x_train, x_test = x_normal[:600], x_normal[600:]
    x_anomal = x[~normal][: len(x_test)]
    keras.utils.set_random_seed(0)
    model = zoo.autoencoder()
    zoo.set_batchnorm_statistics(model, x_train)
    _fit(model, x_train, x_train, 3 if tiny else 30, "mse", batch_size=64)

    def fine_tune(clustered):
        _freeze_batchnorm(clustered)
        _fit(clustered, x_train, x_train, 2 if tiny else 10, "mse", 3e-4, 64)
        return True

    def score(tflite):
        errors = [
            ((_tflm_outputs(tflite, v) - v) ** 2).mean(-1) for v in (x_test, x_anomal)
        ]
        return 100 * _auc(*errors)

    return Task("fc_autoencoder", model, x_train[:64], fine_tune, score, "anomaly AUC")


def tasks(tiny=False, models=None):
    keras.utils.set_random_seed(0)
    models = models or (("ds_cnn",) if tiny else MODELS)
    out = [_digits_task(tiny)]
    train, test, epochs = (32, 32, 1) if tiny else (512, 512, 8)
    for name in models:
        if name == "fc_autoencoder":
            out.append(_autoencoder_task(tiny))
        else:
            out.append(_distillation_task(name, train, test, epochs))
    return out


def _reason(plain, result, floor_bytes, weights, loss, ratio):
    reasons = []
    if ratio > TARGET_RATIO:
        share = weights / plain.size_bytes
        floor = floor_bytes / plain.size_bytes
        tensors, skipped = _compressed(result)
        before = result.report.get("compression", {}).get("size_bytes_before", 0)
        text = (
            f"kernels are {100 * share:.0f}% of the int8 file, so 4-bit indices "
            f"alone give at best {floor:.2f}x"
        )
        if tensors:
            tables = sum(t["bytes_after"] for t in tensors) - sum(
                (t["bytes_before"] // 2) for t in tensors
            )
            kinds = sorted({t["tables"] for t in tensors})
            text += f"; value tables ({', '.join(kinds)}) add {tables:,} B"
        if skipped:
            ops = sorted({s["op"].lower() for s in skipped})
            text += (
                f"; {len(skipped)} kernels ({', '.join(ops)}; "
                f"{sum(s['bytes_before'] for s in skipped):,} B) stay int8: "
                "their 4-bit indices plus value table(s) and the DECODE "
                "operator (~160 B) are not smaller"
            )
        if before > plain.size_bytes:
            text += (
                f"; the clustered, stripped model converts to {before:,} B "
                f"({before / plain.size_bytes:.2f}x) before lut4"
            )
        reasons.append(text)
    if loss > TARGET_LOSS:
        reasons.append(f"loses {loss:.2f} pt")
    return "; ".join(reasons) or "-"


def run_task(task, clusters=16, lut="lut4", routes=tuple(ROUTES)):
    """Rows for `task`: plain int8 against each clustering route + `lut`."""
    start = time.perf_counter()
    plain = _convert(task.model, task.x_cal)
    plain_score = task.score(plain.tflite)
    floor_bytes, weights = _weight_floor(plain, 4)
    out = []
    for route in routes:
        how = ROUTES[route]
        # Each route from the same seed: its figures do not depend on which
        # models and routes ran before it (fit shuffles draw from it).
        keras.utils.set_random_seed(0)
        model = kmt.optimize.fold_batch_norm(task.model) if how["fold"] else task.model
        clustered = kmt.optimize.cluster_weights(
            model,
            number_of_clusters=clusters,
            cluster_per_channel=how["cluster_per_channel"],
        )
        # The route's int8 quantization alone (no clustering): what it costs.
        unclustered = (
            task.score(_convert(model, task.x_cal, None, how["weights"]).tflite)
            if how["weights"] != "per_channel"
            else plain_score
        )
        tuned = task.fine_tune(clustered)
        stripped = kmt.optimize.strip_clustering(clustered)
        result = _convert(stripped, task.x_cal, lut, how["weights"])
        score = task.score(result.tflite)
        ratio = result.size_bytes / plain.size_bytes
        loss = plain_score - score
        tensors, _ = _compressed(result)
        c = result.report.get("compression", {})
        out.append(
            {
                "model": task.name,
                "route": route,
                "metric": task.metric,
                "int8_bytes": plain.size_bytes,
                "int8_score": plain_score,
                "route_int8_score": unclustered,
                "lut_bytes": result.size_bytes,
                "ratio": ratio,
                "floor": floor_bytes / plain.size_bytes,
                "score": score,
                "loss": loss,
                "tensors": len(tensors),
                "per_tensor_tables": sum(t["tables"] == "per tensor" for t in tensors),
                "bytes_saved_by_lut": c.get("bytes_saved", 0),
                "fine_tuned": tuned,
                "arena_ratio": result.arena_bytes / plain.arena_bytes,
                "meets": ratio <= TARGET_RATIO and loss <= TARGET_LOSS,
                "reason": _reason(plain, result, floor_bytes, weights, loss, ratio),
                "seconds": time.perf_counter() - start,
            }
        )
    return out


def _row(r):
    return (
        f"| {r['model']} | {r['route']} | {r['metric']} | {r['int8_bytes']:,} "
        f"| {r['int8_score']:.2f} | {r['route_int8_score']:.2f} "
        f"| {r['lut_bytes']:,} | {r['ratio']:.2f} "
        f"| {'yes' if r['fine_tuned'] else 'no (val.)'} "
        f"| {r['tensors']} ({r['per_tensor_tables']}) "
        f"| {r['score']:.2f} | {r['loss']:+.2f} | {r['floor']:.2f} "
        f"| {r['arena_ratio']:.2f} | {'yes' if r['meets'] else 'no'} "
        f"| {r['reason']} |"
    )


def reading(rows, failed=()):
    """The Reading paragraph: which zoo models meet the target (by either
    route), and why not."""
    zoo_rows = [r for r in rows if r["model"] in zoo.ZOO]
    names = list(dict.fromkeys(r["model"] for r in zoo_rows))
    met = sorted({r["model"] for r in zoo_rows if r["meets"]}, key=names.index)
    out = [
        f"Target (issue 19): lut4 flash <= {TARGET_RATIO:.2f}x the plain int8 "
        f"flatbuffer at <= {TARGET_LOSS} pt loss, every model run in TFLite "
        f"Micro. {len(met)} of table 1's {len(names) + len(failed)} models "
        f"meet it by one route or the other "
        f"({', '.join(met) or 'none'})."
    ]
    for name in names:
        if name in met:
            continue
        for r in (r for r in zoo_rows if r["model"] == name):
            out.append(
                f"{name} ({r['route']}): {r['ratio']:.2f}x, {r['loss']:+.2f} pt: "
                f"{r['reason']}."
            )
    for name, error in failed:
        out.append(f"{name}: failed ({error[:120]}).")
    out.append(
        "Decoded weights live in the arena (column arena x), so lut4 trades "
        "RAM for flash; the floor column is the per-channel int8 file with "
        "every kernel as bare 4-bit indices, the rest unchanged."
    )
    return " ".join(out)


def main(tiny=False, models=None, json_path=None):
    print(
        "| model | route | metric (TFLM) | int8 flash (B) | int8 | route int8 "
        "| lut4 flash (B) "
        "| x int8 | fine-tuned | lut tensors (per tensor) | lut4 | loss (pt) "
        "| lut4 floor x | arena x | target met | why not |"
    )
    print("|---" * 16 + "|", flush=True)
    rows, failed = [], []
    for task in tasks(tiny, models):
        try:
            new = run_task(task)
        except Exception as error:  # Report the model and go on to the next.
            failed.append((task.name, f"{type(error).__name__}: {error}"))
            print(f"| {task.name} | FAILED: {failed[-1][1][:200]} |", flush=True)
            continue
        rows += new
        for r in new:
            print(_row(r), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"rows": rows, "reading": reading(rows, failed)}, f, indent=1)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="fast smoke run")
    parser.add_argument(
        "--models", default=None, help="comma-separated zoo models (default: all)"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    main(args.tiny, args.models.split(",") if args.models else None, args.json)
