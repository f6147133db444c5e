"""Table 2: fine-tuning efficiency on the digits transfer task.

Pretrain the demo backbone on digits 0-4, then adapt to digits 5-9 with a few
labelled samples per class by four methods, each in its own process so peak
memory is its own: head only, bias + head (TinyTL-style), MicroTune adapters
(ours), full fine-tuning. Columns: int8 accuracy measured on TFLite Micro,
trainable parameters, bytes of the trained parameters (the update payload,
float32), train step time as a ratio to full fine-tuning (median of the
per-epoch step times), and peak resident memory of the process.

    python -m benchmarks.finetune [--tiny]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

METHODS = ("head", "bias+head", "microtune", "full")


def _setup(method, backbone_path):
    import keras

    import keras_microtune as kmt
    from keras_microtune.callbacks._base import sublayers

    backbone = keras.saving.load_model(backbone_path)
    if method == "microtune":
        return kmt.attach(backbone, num_classes=5, groups=2)
    model = kmt.attach(backbone, num_classes=5, adapters=None, freeze=method != "full")
    if method == "bias+head":
        # TinyTL-style: biases and BatchNorm offsets train; BatchNorm keeps
        # inference mode because its own layer stays frozen.
        for layer in model.layers[1:-2]:
            layer.trainable = True
            for sub in sublayers(layer):
                sub.trainable = False
            for variable in layer.weights:
                variable.trainable = variable.path.endswith(("bias", "beta"))
    return model


def _child(method, backbone_path, epochs):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    import keras_microtune as kmt

    keras.utils.set_random_seed(1)
    digits = kmt.data.load_digits_transfer(shots=20)
    (x_train, y_train), (x_test, y_test) = digits["train"], digits["test"]
    model = _setup(method, backbone_path)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    from benchmarks.callbacks_overhead import FitTimer

    timer = FitTimer()
    model.fit(
        x_train, y_train, epochs=epochs, batch_size=16, verbose=0, callbacks=[timer]
    )
    steps = int(np.ceil(len(y_train) / 16))
    step_time = float(np.median(timer.times[1:] or timer.times)) / steps
    result = kmt.convert(model, target="mcu", representative_data=x_train)
    metrics = kmt.evaluate(result.tflite, x_test, y_test, runtime="tflm")
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return {
        "method": method,
        "int8_accuracy": metrics["accuracy"],
        "trainable": trainable,
        "payload_bytes": 4 * trainable,
        "step_seconds": step_time,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run(tiny=False):
    import keras

    import keras_microtune as kmt
    from keras_microtune.demo import build_backbone

    keras.utils.set_random_seed(0)
    epochs_pre, epochs = (1, 2) if tiny else (20, 40)
    digits = kmt.data.load_digits_transfer(shots=20)
    backbone = build_backbone()
    backbone.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    backbone.fit(*digits["source"], epochs=epochs_pre, batch_size=32, verbose=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "backbone.keras")
        backbone.save(path)
        for method in METHODS:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.finetune",
                    "--child",
                    method,
                    "--backbone",
                    path,
                    "--epochs",
                    str(epochs),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    full = next(r for r in rows if r["method"] == "full")
    lines = [
        "| method | int8 accuracy (TFLM) | trainable params | update payload (bytes) "
        "| step time vs full | peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["step_seconds"] / full["step_seconds"]
        lines.append(
            f"| {r['method']} | {r['int8_accuracy']:.4f} | {r['trainable']:,} "
            f"| {r['payload_bytes']:,} | {ratio:.2f} | {r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines), rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke mode")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=40, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.backbone, args.epochs)))
        return
    table, _ = run(tiny=args.tiny)
    print(table)


if __name__ == "__main__":
    main()
