"""Table 2: the transfer suite. Few trainable parameters vs full fine-tuning.

Five tasks (benchmarks/transfer_tasks.py, all data bundled): each backbone is
pretrained once on its source task, saved in a temporary folder, then
adapted to the target task by each method in its own child process (so its
peak memory is its own), 3 seeds each, the same epochs and batch size:

- head: a new head on the frozen backbone;
- bias+norm: plus every bias and norm affine parameter (BatchNorm in
  inference mode, TinyTL-style);
- full: every weight trains (BatchNorm statistics stay frozen, as for the
  other methods: in training mode they collapse on 36-100 samples); the best
  of 3 learning rates, chosen on a stratified validation split of the target
  train set (not the test set);
- default: `kmt.attach(backbone, num_classes=k)` as shipped;
- data: `kmt.attach(backbone, num_classes=k, data=(x_train, y_train))`, the
  default placement with the new head first fitted on the frozen features;
- budget: `kmt.attach(..., budget=BUDGET, data=(x_train, y_train))` (its head
  is fitted on the data too);
- microtune: `kmt.attach(..., groups=2)`, the grouped block adapter.

Columns: int8 accuracy measured in TFLite Micro (`kmt.convert(target="mcu")`,
`kmt.evaluate(runtime="tflm")`), mean ± sd over seeds; trainable parameters
as % of full fine-tuning's; deployed flatbuffer bytes and the difference to
full fine-tuning's (the backbone's own int8 model with the new head; the
backbone with its source head is listed under the table); `fit` wall time
and median step time / full fine-tuning's (medians over seeds, the same run),
and `fit` wall time / full fine-tuning's through `keras.Model.fit` itself (the
same model and weights trained by plain Keras, which traces the train step
twice and builds an iterator per epoch; `PrefixCacheModel.fit` does neither);
peak training memory: the growth of the child's peak RSS (VmHWM, reset just
before) over its first fit, 2 steps at MEMORY_BATCH samples, where
activations dominate (tracing is included and about equal for all methods).

    python -m benchmarks.transfer [--tiny] [--tasks ...] [--methods ...] [--tune-lr]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import transfer_tasks as tasks

METHODS = ("head", "bias+norm", "full", "default", "data", "budget", "microtune")
BUDGET = 0.1  # fraction of full fine-tuning's trainable parameters
LEARNING_RATE = 1e-2
FULL_LEARNING_RATES = (1e-3, 3e-3, 1e-2)
EPOCHS, BATCH = 40, 16
MEMORY_BATCH = 512
SEEDS = (0, 1, 2)


def setup(method, backbone, train, classes):
    """The model `method` trains, built from the pretrained `backbone`."""
    import keras_microtune as kmt

    if method == "default":
        return kmt.attach(backbone, num_classes=classes)
    if method == "data":  # the default placement, head fitted on the data
        return kmt.attach(backbone, num_classes=classes, data=train)
    if method == "budget":
        return kmt.attach(backbone, num_classes=classes, budget=BUDGET, data=train)
    if method == "microtune":
        return kmt.attach(backbone, num_classes=classes, groups=2)
    if method == "bias+norm":
        return kmt.attach(
            backbone,
            num_classes=classes,
            adapters=None,
            train_bias=True,
            train_norm=True,
        )
    model = kmt.attach(
        backbone, num_classes=classes, adapters=None, freeze=method != "full"
    )
    if method == "full":
        _freeze_batchnorm_statistics(model)
    return model


def _freeze_batchnorm_statistics(model):
    """BatchNorm in inference mode; its gamma and beta still train."""
    import keras

    from keras_microtune.callbacks._base import sublayers

    for layer in sublayers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            for variable in (layer.gamma, layer.beta):
                if variable is not None:
                    variable.trainable = True


def _rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field))


def peak_training_mib(make, x, y, lr, batch=None):
    """Peak RSS growth (MiB) over the first fit of 2 steps at `batch` samples.

    Run first in a fresh process: the growth is the training step's working
    set (activations kept for the backward pass, gradients, optimizer state)
    plus tracing, which is about the same for every method.
    """
    import keras
    import numpy as np

    batch = batch or MEMORY_BATCH
    index = np.arange(2 * batch) % len(y)
    # TensorFlow's and Keras' one-time set-up happens in a throwaway fit
    # first, for every method. What `data` and `budget` trace in `attach()`
    # (the head's fit) still happens before the reset, so their growth reads
    # lower for that too (BENCHMARKS.md, table 2's notes).
    warm = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    warm.compile(keras.optimizers.Adam(), "mse")
    warm.fit(np.zeros((2, 1)), np.zeros((2, 1)), verbose=0)
    model = make()
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    model.fit(x[index], y[index], batch_size=batch, verbose=0)
    return (_rss_kib("VmHWM") - before) / 1024


def train_once(
    method, backbone_path, data, lr, seed, epochs, train=None, plain_keras=False
):
    """Train one seed; the model, fit seconds and median step seconds.
    `plain_keras`: train through `keras.Model.fit`, not the model's own.
    The `attach()` seconds are on the model as `attach_seconds`."""
    import keras
    import numpy as np

    from benchmarks.callbacks_overhead import FitTimer

    x, y = train or data["train"]
    keras.utils.set_random_seed(seed)
    backbone = keras.saving.load_model(backbone_path)
    start = time.perf_counter()
    model = setup(method, backbone, (x, y), data["classes"])
    model.attach_seconds = time.perf_counter() - start
    model.compile(
        keras.optimizers.Adam(lr),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    timer = FitTimer()
    start = time.perf_counter()
    fit = keras.Model.fit if plain_keras else type(model).fit
    fit(model, x, y, epochs=epochs, batch_size=BATCH, verbose=0, callbacks=[timer])
    seconds = time.perf_counter() - start
    return model, seconds, float(np.median(timer.steps or [seconds]))


def choose_learning_rate(
    backbone_path, data, epochs, rates=FULL_LEARNING_RATES, method="full"
):
    """`method`'s learning rate with the best validation accuracy."""
    fit, val = tasks.validation_split(*data["train"])
    scores = []
    for lr in rates:
        model, _, _ = train_once(method, backbone_path, data, lr, 0, epochs, fit)
        scores.append(model.evaluate(*val, verbose=0, return_dict=True)["accuracy"])
    return rates[scores.index(max(scores))], scores


def measure(task, method, backbone_path, epochs, seeds, tiny=False, tune=False):
    """Every figure of one (task, method) row; runs inside one process.

    Full fine-tuning's learning rate is chosen on a validation split; with
    `tune`, every method's is (the same rates and split).
    """
    import keras
    import numpy as np

    import keras_microtune as kmt

    data = tasks.load(task)
    x, y = data["train"]
    lr, val_scores = LEARNING_RATE, None

    def make():
        keras.utils.set_random_seed(0)
        return setup(
            method, keras.saving.load_model(backbone_path), (x, y), data["classes"]
        )

    # The memory probe is this process's first fit, before anything else has
    # traced or allocated (the learning rate does not change the working
    # set). Smoke mode skips it (one more traced fit per method).
    memory = None if tiny else peak_training_mib(make, x, y, lr)
    if method == "full" or tune:
        rates = FULL_LEARNING_RATES[:1] if tiny else FULL_LEARNING_RATES
        lr, val_scores = choose_learning_rate(
            backbone_path, data, epochs, rates, method
        )
    x_test, y_test = data["test"]
    if tiny:
        x_test, y_test = x_test[:200], y_test[:200]
    row = {
        "task": task,
        "method": method,
        "lr": lr,
        "val_scores": val_scores,
        "memory_mib": memory,
        "accuracy": [],
        "fit_seconds": [],
        "step_seconds": [],
    }
    for seed in seeds:
        model, seconds, step = train_once(method, backbone_path, data, lr, seed, epochs)
        result = kmt.convert(model, target="mcu", representative_data=x, verbose=0)
        metrics = kmt.evaluate(result, x_test, y_test, runtime="tflm")
        row["accuracy"].append(float(metrics["accuracy"]))
        row["fit_seconds"].append(seconds)
        row["step_seconds"].append(step)
        row.setdefault("attach_seconds", []).append(model.attach_seconds)
        row["trainable"] = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        row["bytes"] = int(result.size_bytes)
        if method == "full":
            _, seconds, _ = train_once(
                method, backbone_path, data, lr, seed, epochs, plain_keras=True
            )
            row.setdefault("keras_fit_seconds", []).append(seconds)
    return row


def _child(task, method, path, epochs, seeds, tune=False):
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.transfer",
        "--child",
        task,
        method,
        "--backbone",
        path,
        "--epochs",
        str(epochs),
        "--seeds",
        *map(str, seeds),
    ] + (["--tune-lr"] if tune else [])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{task}/{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(tiny=False, task_names=tasks.TASKS, methods=METHODS, tune=False):
    import keras_microtune as kmt

    epochs = 1 if tiny else EPOCHS
    seeds = SEEDS[:1] if tiny else SEEDS
    rows, backbones = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in task_names:
            data = tasks.load(task)
            model, source_accuracy = tasks.pretrain(task, data, tiny=tiny)
            path = os.path.join(tmp, f"{task}.keras")
            model.save(path)
            own = kmt.convert(
                model, target="mcu", representative_data=data["train"][0], verbose=0
            )
            backbones[task] = {
                "bytes": int(own.size_bytes),
                "source_accuracy": source_accuracy,
            }
            for method in methods:
                if tiny:  # one process: the figures are not meaningful anyway
                    row = measure(task, method, path, epochs, seeds, True, tune)
                else:
                    row = _child(task, method, path, epochs, seeds, tune)
                rows.append(row)
                print(
                    f"# {task} {method}: {json.dumps(row)}", file=sys.stderr, flush=True
                )
    return rows, backbones


def _mean_sd(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.mean(values), sd


def _ratio(fields, key):
    return f"{fields[key]:.2f}" if key in fields else "-"


def _mib(value):
    return "-" if value is None else f"{value:.0f}"


def _avg(items, key):
    values = [i[key] for i in items if key in i]
    return statistics.mean(values) if values else float("nan")


def table(rows, backbones):
    by = {(r["task"], r["method"]): r for r in rows}
    lines = [
        "| task | method | int8 accuracy (TFLM) | trainable (% of full) "
        "| deployed int8 bytes (+ vs full) | fit time / full (/ full in plain "
        "Keras fit) | step time / full "
        f"| peak training memory, batch {MEMORY_BATCH} (MiB; / full) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for r in rows:
        full = by.get((r["task"], "full"))
        mean, sd = _mean_sd(r["accuracy"])
        base = full["bytes"] if full else backbones[r["task"]]["bytes"]
        fields = {
            "accuracy": mean,
            "bytes": r["bytes"] / base,
            "extra": r["bytes"] - base,
        }
        if full:
            fields["trainable"] = r["trainable"] / full["trainable"]
            fields["fit"] = statistics.median(r["fit_seconds"]) / statistics.median(
                full["fit_seconds"]
            )
            if full.get("keras_fit_seconds"):
                fields["keras_fit"] = statistics.median(
                    r["fit_seconds"]
                ) / statistics.median(full["keras_fit_seconds"])
            fields["step"] = statistics.median(r["step_seconds"]) / statistics.median(
                full["step_seconds"]
            )
            if r["memory_mib"] is not None:
                fields["memory"] = r["memory_mib"] / max(full["memory_mib"], 1e-9)
            fields["delta"] = mean - _mean_sd(full["accuracy"])[0]
        summary.setdefault(r["method"], []).append(fields)

        trainable = f"{r['trainable']:,}" + (
            f" ({100 * fields['trainable']:.1f}%)" if full else ""
        )
        lines.append(
            f"| {r['task']} | {r['method']} | {mean:.3f} ± {sd:.3f} | {trainable} "
            f"| {r['bytes']:,} ({fields['extra']:+,}) | {_ratio(fields, 'fit')} "
            f"({_ratio(fields, 'keras_fit')}) "
            f"| {_ratio(fields, 'step')} "
            f"| {_mib(r['memory_mib'])} ({_ratio(fields, 'memory')}) |"
        )
    for method, items in summary.items():
        lines.append(
            f"| suite average | {method} | {_avg(items, 'accuracy'):.3f} "
            f"| {100 * _avg(items, 'trainable'):.1f}% | {_avg(items, 'bytes'):.3f} "
            f"| {_avg(items, 'fit'):.2f} ({_avg(items, 'keras_fit'):.2f}) "
            f"| {_avg(items, 'step'):.2f} | ({_avg(items, 'memory'):.2f}) |"
        )
    return "\n".join(lines), summary


def _vs_keras(items):
    ratios = [i["keras_fit"] for i in items if "keras_fit" in i]
    if not ratios:
        return "full fine-tuning in plain Keras fit not timed"
    return f"at most {max(ratios):.2f}x full fine-tuning in plain Keras fit"


def reading(summary, method="default"):
    """The issue's targets for `method`, checked against the measured rows."""
    items = [i for i in summary.get(method, []) if "delta" in i]
    if not items:
        return f"No `{method}` and `full` rows to compare."
    deltas = [100 * i["delta"] for i in items]
    checks = [
        (
            f"suite-average int8 accuracy vs full fine-tuning "
            f"{statistics.mean(deltas):+.1f} pt (target >= -1)",
            statistics.mean(deltas) >= -1,
        ),
        (f"worst task {min(deltas):+.1f} pt (target >= -2)", min(deltas) >= -2),
        (
            f"trainable at most {100 * max(i['trainable'] for i in items):.1f}% of "
            "full (target <= 10%)",
            max(i["trainable"] for i in items) <= 0.10,
        ),
        (
            f"fit time at most {max(i['fit'] for i in items):.2f}x full (target "
            f"<= 0.33x; {_vs_keras(items)})",
            max(i["fit"] for i in items) <= 0.33,
        ),
        (
            f"deployed int8 model at most {max(i['extra'] for i in items):+,} bytes "
            "vs full fine-tuning's, i.e. the backbone's int8 model with the new "
            "head (target +0)",
            max(i["extra"] for i in items) <= 0,
        ),
    ]
    memory = [i["memory"] for i in items if "memory" in i]
    if memory:
        checks.append(
            (
                f"peak training memory at most {max(memory):.2f}x full's (target "
                "< 1 on every task)",
                max(memory) < 1,
            )
        )
    return (
        f"Targets for `attach()` ({method}): "
        + "; ".join(f"{text}: {'met' if ok else 'NOT met'}" for text, ok in checks)
        + "."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke mode")
    parser.add_argument(
        "--tasks", nargs="*", choices=tasks.TASKS, help="default: all (tiny: digits)"
    )
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", help="also write rows and reading to this file")
    parser.add_argument(
        "--tune-lr",
        action="store_true",
        help="choose every method's learning rate on the validation split, as "
        "full fine-tuning's always is",
    )
    parser.add_argument(
        "--combine",
        nargs="*",
        help="print the table of earlier --json files (e.g. one per task)",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=list(SEEDS), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        task, method = args.child
        row = measure(
            task, method, args.backbone, args.epochs, args.seeds, tune=args.tune_lr
        )
        print(json.dumps(row))
        return
    args.tasks = args.tasks or (["digits"] if args.tiny else list(tasks.TASKS))
    start = time.perf_counter()
    if args.combine:
        rows, backbones = [], {}
        for path in args.combine:
            with open(path) as f:
                saved = json.load(f)
            rows += saved["rows"]
            backbones.update(saved["backbones"])
        args.tasks = [t for t in tasks.TASKS if t in backbones]
    else:
        rows, backbones = run(args.tiny, args.tasks, args.methods, args.tune_lr)
    text, summary = table(rows, backbones)
    read = "\n\n".join(
        reading(summary, method)
        for method in ("default", "data")
        if method == "default" or method in summary
    )
    print(text)
    print()
    for task in args.tasks:
        b = backbones[task]
        print(
            f"- {task}: {tasks.DESCRIPTIONS[task]}; backbone int8 {b['bytes']:,} "
            f"bytes, source accuracy (float, inference mode) {b['source_accuracy']:.3f}"
        )
    print(f"\n{read}\n\n({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "backbones": backbones, "reading": read}, f)


if __name__ == "__main__":
    main()
