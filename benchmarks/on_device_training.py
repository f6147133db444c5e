"""On-device training: the `mobile-trainable` file trained only in LiteRT vs Keras.

Task: digits 0-4 -> 5-9 with 20 shots per class on the demo backbone
(benchmarks/transfer_tasks.py, "digits"). The pretrained backbone is
`kmt.attach`ed with the default placement (LoRA on the last two layers'
kernels, every bias and BatchNorm scale/offset, the new head), compiled with
Adam(1e-2) as in the transfer suite, and exported once with
`kmt.convert(target="mobile-trainable", train_batch_size=BATCH)` before any
training. Then the same epochs over the same shuffled batches (one seeded
permutation per epoch, BATCH divides the 100 training samples) train:

- in LiteRT only: the `train` signature runner, one call per batch;
- in Keras: `model.train_on_batch` on the same batches.

Columns: test accuracy on the held-out digits 5-9 (LiteRT's `infer` vs
Keras' `predict`), the largest weight difference between the two after
training, the file size (and the float32 inference-only file of the same
model, `kmt.convert(target="float32")`, which merges LoRA into the kernels),
and the LiteRT train-step latency (median over all steps, one thread) next
to one Keras `train_on_batch` step (median, after tracing). The same steps
also train the `mobile-trainable-int8` file (frozen weights stored int8).

    python -m benchmarks.on_device_training [--tiny] [--json PATH]
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

EPOCHS, BATCH, LEARNING_RATE = 40, 20, 1e-2


def run(tiny=False, epochs=EPOCHS, seed=0):
    """All figures of the table as a dict."""
    import keras
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    import keras_microtune as kmt
    from benchmarks import transfer_tasks as tasks

    epochs = 2 if tiny else epochs
    data = tasks.load("digits")
    backbone, _ = tasks.pretrain("digits", data, tiny=tiny, seed=seed)
    (x, y), (x_test, y_test) = data["train"], data["test"]
    x, x_test = x.astype("float32"), x_test.astype("float32")
    y, y_test = y.astype("int32"), y_test.astype("int32")
    keras.utils.set_random_seed(seed)
    model = kmt.attach(backbone, num_classes=data["classes"])
    model.compile(
        keras.optimizers.Adam(LEARNING_RATE), "sparse_categorical_crossentropy"
    )

    start = time.perf_counter()
    result = kmt.convert(model, "mobile-trainable", train_batch_size=BATCH, verbose=0)
    export_seconds = time.perf_counter() - start
    int8 = kmt.convert(
        model, "mobile-trainable-int8", train_batch_size=BATCH, verbose=0
    )
    inference = kmt.convert(model, "float32", verbose=0)

    rng = np.random.default_rng(seed)
    orders = [rng.permutation(len(y)) for _ in range(epochs)]
    batches = [o[i : i + BATCH] for o in orders for i in range(0, len(y), BATCH)]
    batches = [b for b in batches if len(b) == BATCH]

    def train_in_litert(tflite):
        interp = Interpreter(model_content=bytes(tflite), num_threads=1)
        train = interp.get_signature_runner("train")
        losses, steps = [], []
        for b in batches:
            t = time.perf_counter()
            losses.append(float(train(x=x[b], y=y[b])["loss"]))
            steps.append(time.perf_counter() - t)
        return interp, losses, steps

    interp, lite_losses, lite_steps = train_in_litert(result.tflite)
    interp8, _, int8_steps = train_in_litert(int8.tflite)
    int8_probs = interp8.get_signature_runner("infer")(x=x_test)["output"]
    keras_losses, keras_steps = [], []
    for b in batches:
        t = time.perf_counter()
        keras_losses.append(float(model.train_on_batch(x[b], y[b])))
        keras_steps.append(time.perf_counter() - t)

    lite_probs = interp.get_signature_runner("infer")(x=x_test)["output"]
    keras_probs = model.predict(x_test, batch_size=256, verbose=0)
    weights = interp.get_signature_runner("get_weights")()
    names = [v["name"] for v in result.report["training"]["variables"]]
    weight_error = max(
        float(np.max(np.abs(weights[n] - keras.ops.convert_to_numpy(v))))
        for n, v in zip(names, model.trainable_variables)
    )
    lite_acc = float(np.mean(np.argmax(lite_probs, -1) == y_test))
    keras_acc = float(np.mean(np.argmax(keras_probs, -1) == y_test))
    return {
        "epochs": epochs,
        "batch": BATCH,
        "steps": len(batches),
        "test_samples": int(len(y_test)),
        "trained_parameters": result.report["training"]["trained_parameters"],
        "trained_variables": len(names),
        "litert_accuracy": lite_acc,
        "keras_accuracy": keras_acc,
        "accuracy_gap_points": 100 * (lite_acc - keras_acc),
        "final_loss_litert": lite_losses[-1],
        "final_loss_keras": keras_losses[-1],
        "max_loss_difference": float(
            np.max(np.abs(np.array(lite_losses) - np.array(keras_losses)))
        ),
        "max_weight_difference": weight_error,
        "int8_litert_accuracy": float(np.mean(np.argmax(int8_probs, -1) == y_test)),
        "bytes": result.size_bytes,
        "int8_bytes": int8.size_bytes,
        "int8_step_ms": 1e3 * statistics.median(int8_steps),
        "float32_inference_bytes": inference.size_bytes,
        "litert_step_ms": 1e3 * statistics.median(lite_steps),
        "keras_step_ms": 1e3 * statistics.median(keras_steps[1:] or keras_steps),
        "export_seconds": export_seconds,
        "ops": len(result.ops),
    }


def table(r) -> str:
    rows = [
        (
            f"test accuracy ({r['test_samples']} digits 5-9), trained in LiteRT only",
            f"{r['litert_accuracy']:.3f}",
        ),
        ("test accuracy, same steps in Keras", f"{r['keras_accuracy']:.3f}"),
        ("difference (points)", f"{r['accuracy_gap_points']:+.2f}"),
        (
            "max loss / weight difference",
            f"{r['max_loss_difference']:.2g} / {r['max_weight_difference']:.2g}",
        ),
        (
            "trained parameters (variables)",
            f"{r['trained_parameters']:,} ({r['trained_variables']})",
        ),
        (
            "steps (epochs x batches of {})".format(r["batch"]),
            f"{r['steps']} ({r['epochs']} epochs)",
        ),
        (
            "test accuracy, mobile-trainable-int8 trained in LiteRT",
            f"{r['int8_litert_accuracy']:.3f}",
        ),
        ("mobile-trainable file", f"{r['bytes']:,} B"),
        ("mobile-trainable-int8 file (frozen weights int8)", f"{r['int8_bytes']:,} B"),
        ("float32 inference file (LoRA merged)", f"{r['float32_inference_bytes']:,} B"),
        ("LiteRT train step (median, 1 thread)", f"{r['litert_step_ms']:.2f} ms"),
        ("LiteRT train step, int8 file", f"{r['int8_step_ms']:.2f} ms"),
        ("Keras train_on_batch step (median)", f"{r['keras_step_ms']:.2f} ms"),
        ("export time", f"{r['export_seconds']:.1f} s"),
    ]
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke mode")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(args.tiny)
    print(table(result))
    print(f"\n({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
