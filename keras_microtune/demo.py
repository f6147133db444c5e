"""The main job end to end on bundled real data (`keras-microtune demo`).

1. pretrain a small backbone (FeatureStage + EmbeddingStage + OutputStage) on
   scikit-learn's handwritten digits 0-4;
2. `kmt.attach` it (default placement) to a new task, digits 5-9, with a few
   labelled samples per class;
3. microtune with the callbacks (warmup + cosine learning rate, the
   quantization-aware training schedule);
4. convert for `cortex-m4` and verify on TFLite Micro;
5. fine-tune every weight of the same backbone on the same data, for
   comparison; print a summary table and write everything to the output
   folder.

Set `KMT_DEMO_QUICK=1` (or pass `quick=True`) for a smoke run of a few seconds.
"""

import json
import os
import time

import keras
import numpy as np

from keras_microtune import callbacks, data, layers, optimize
from keras_microtune.attach import attach

SHOTS = 20
TARGET = "cortex-m4"


def _epochs(quick):
    return (
        {"pretrain": 2, "microtune": 3} if quick else {"pretrain": 20, "microtune": 40}
    )


def build_backbone(num_classes=5):
    """The demo backbone: three FeatureStages (so attach() finds block ends)."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.FeatureStage([32], stem_filters=16, pooling="max", name="block1"),
            layers.FeatureStage([64, 64], name="block2"),
            layers.FeatureStage([64], pooling="max", name="block3"),
            layers.EmbeddingStage("avg", units=64, activation="relu"),
            layers.OutputStage(num_classes),
        ],
        name="digits_backbone",
    )


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _table(rows):
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def run(output_dir="build/demo", quick=None, verbose=1, overwrite=True):
    """Run the demo; return a dict of the figures it printed."""
    from keras_microtune.export.converter import convert
    from keras_microtune.export.evaluate import evaluate

    quick = bool(int(os.environ.get("KMT_DEMO_QUICK", "0"))) if quick is None else quick
    epochs = _epochs(quick)
    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    digits = data.load_digits_transfer(shots=SHOTS)
    (x_src, y_src), (x_train, y_train) = digits["source"], digits["train"]
    x_test, y_test = digits["test"]

    _say(verbose, f"1/5 pretraining the backbone on digits 0-4 ({len(y_src)} images)")
    backbone = build_backbone()
    backbone.compile(
        keras.optimizers.Adam(3e-3),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    backbone.fit(
        x_src, y_src, epochs=epochs["pretrain"], batch_size=32, verbose=verbose
    )

    _say(verbose, f"2/5 attaching MicroTune to digits 5-9 ({SHOTS} images per class)")
    model = optimize.quantize_model(attach(backbone, num_classes=5))
    model.compile(
        keras.optimizers.Adam(1e-2),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

    _say(verbose, "3/5 microtuning with WarmupCosine and QuantizationSchedule")
    total = epochs["microtune"]
    steps = total * -(-len(y_train) // 16)
    schedule = [
        callbacks.WarmupCosine(
            1e-2, warmup_steps=steps // 10, decay_steps=steps, min_learning_rate=1e-4
        ),
        callbacks.QuantizationSchedule(
            start_epoch=total // 2,
            freeze_ranges_epoch=total - max(1, total // 8),
            freeze_batch_norm_epoch=total // 2,
        ),
    ]
    fit_start = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        epochs=total,
        batch_size=16,
        callbacks=schedule,
        verbose=verbose,
    )
    fit_seconds = time.perf_counter() - fit_start
    float_metrics = evaluate(model, x_test, y_test, runtime="keras")

    _say(verbose, f"4/5 converting for {TARGET} and verifying on TFLite Micro")
    result = convert(
        model,
        target=TARGET,
        representative_data=x_train,
        validation_data=(x_test, y_test),
    )
    int8_metrics = evaluate(result.tflite, x_test, y_test, runtime="tflm")
    full = _full_finetune(backbone, digits, total, verbose)

    seconds = time.perf_counter() - start
    figures = {
        "float_accuracy": float_metrics["accuracy"],
        "int8_accuracy_tflm": int8_metrics["accuracy"],
        "trainable_parameters": _trainable(model),
        "total_parameters": int(model.count_params()),
        "flatbuffer_bytes": result.size_bytes,
        "arena_bytes": result.arena_bytes,
        "fits": bool(result.fits),
        "full_finetune_int8_accuracy_tflm": full["int8_accuracy"],
        "full_finetune_trainable_parameters": full["trainable"],
        "full_finetune_flatbuffer_bytes": full["bytes"],
        "fit_seconds_vs_full_finetune": round(fit_seconds / full["fit_seconds"], 2),
        "wall_seconds": round(seconds, 1),
    }
    rows = [
        (
            "Keras accuracy (QAT model, digits 5-9 test)",
            f"{figures['float_accuracy']:.4f}",
        ),
        ("int8 accuracy (TFLite Micro)", f"{figures['int8_accuracy_tflm']:.4f}"),
        (
            "trainable / total parameters",
            f"{figures['trainable_parameters']:,} / {figures['total_parameters']:,}",
        ),
        ("flatbuffer bytes", f"{figures['flatbuffer_bytes']:,}"),
        ("tensor arena bytes (measured)", f"{figures['arena_bytes']:,}"),
        (f"fits {TARGET}", "yes" if figures["fits"] else "no"),
        (
            "full fine-tuning: int8 accuracy (TFLite Micro)",
            f"{figures['full_finetune_int8_accuracy_tflm']:.4f}",
        ),
        (
            "full fine-tuning: trainable parameters",
            f"{figures['full_finetune_trainable_parameters']:,}",
        ),
        (
            "full fine-tuning: flatbuffer bytes",
            f"{figures['full_finetune_flatbuffer_bytes']:,}",
        ),
        (
            "microtune fit time / full fine-tuning's (QAT vs float)",
            f"{figures['fit_seconds_vs_full_finetune']:.2f}",
        ),
        ("wall time", f"{seconds:.1f} s"),
    ]
    table = _table(rows)
    _say(verbose, f"5/5 writing {output_dir}\n\n{table}\n")
    result.save(
        output_dir,
        overwrite=overwrite,
        history=history.history,
        evaluations={
            "float (Keras)": float_metrics,
            "int8 (TFLite Micro)": int8_metrics,
        },
        project=True,
    )
    with open(os.path.join(output_dir, "demo.json"), "w") as f:
        json.dump(figures, f, indent=2)
    with open(os.path.join(output_dir, "demo.md"), "w") as f:
        f.write(f"# keras-microtune demo\n\n{table}\n")
    return figures


def _full_finetune(backbone, digits, epochs, verbose):
    """The comparison: every weight trains (float, then int8 by calibration)."""
    from keras_microtune.export.converter import convert
    from keras_microtune.export.evaluate import evaluate

    _say(verbose, "   for comparison: full fine-tuning of the same backbone")
    keras.utils.set_random_seed(0)
    model = attach(backbone, num_classes=5, adapters=None, freeze=False)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    start = time.perf_counter()
    model.fit(*digits["train"], epochs=epochs, batch_size=16, verbose=0)
    seconds = time.perf_counter() - start
    result = convert(
        model, target=TARGET, representative_data=digits["train"][0], verbose=0
    )
    metrics = evaluate(result.tflite, *digits["test"], runtime="tflm")
    return {
        "int8_accuracy": metrics["accuracy"],
        "trainable": _trainable(model),
        "bytes": result.size_bytes,
        "fit_seconds": seconds,
    }


def _say(verbose, text):
    if verbose:
        print(text, flush=True)
