"""Where should the default `attach()` train? A sweep of placements on the
transfer suite's tasks (float accuracy in Keras, 3 seeds, table 2's epochs,
batch size and learning rate), used to choose the default placement.

A placement is written as `+`-joined parts over the backbone's top-level
blocks (the layers named `block*`), counted from the head:

- `L<r>:<k>`: Keras LoRA of rank r on every kernel of the last k blocks;
- `N:<k>`: BatchNorm/LayerNorm scale and offset of the last k blocks;
- `B:<k>`: biases (and norm offsets) of the last k blocks;

plus `default` (`kmt.attach` as shipped), `head`, `full` and `budget<f>`;
`@<lr>` sets the learning rate. Example:

    python -m benchmarks.placement_sweep vowels "full@0.003,default,L2:3+B:3,L4:1+N:1"
"""

import argparse
import os
import tempfile
import time

from benchmarks import transfer
from benchmarks import transfer_tasks as tasks

SEEDS = (0, 1, 2)


def build(spec, backbone, data):
    """The attached model for placement `spec`, and its learning rate."""
    import keras_microtune as kmt

    spec, _, lr = spec.partition("@")
    lr = float(lr) if lr else transfer.LEARNING_RATE
    x, y = data["train"]
    k = data["classes"]
    if spec == "default":
        return kmt.attach(backbone, num_classes=k), lr
    if spec == "head":
        return kmt.attach(backbone, num_classes=k, adapters=None), lr
    if spec == "full":
        model = kmt.attach(backbone, num_classes=k, adapters=None, freeze=False)
        transfer._freeze_batchnorm_statistics(model)
        return model, lr
    if spec.startswith("budget"):
        budget = float(spec[len("budget") :] or transfer.BUDGET)
        return kmt.attach(backbone, num_classes=k, budget=budget, data=(x, y)), lr
    blocks = [layer.name for layer in backbone.layers if layer.name.startswith("block")]
    kwargs = {"adapters": None}
    for part in spec.split("+"):
        kind, _, count = part.partition(":")
        last = blocks[-int(count) :]
        if kind.startswith("L"):
            kwargs["lora"] = {name: int(kind[1:]) for name in last}
        elif kind == "N":
            kwargs["train_norm"] = last
        elif kind == "B":
            kwargs["train_bias"] = last
        else:
            raise ValueError(f"Unknown placement part {part!r}; see the module docs.")
    return kmt.attach(backbone, num_classes=k, **kwargs), lr


def sweep(task, specs, seeds=SEEDS, epochs=transfer.EPOCHS):
    """{spec: (mean accuracy, sd, trainable parameters, median fit seconds)}."""
    import keras
    import numpy as np

    data = tasks.load(task)
    (x, y), (x_test, y_test) = data["train"], data["test"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "backbone.keras")
        tasks.pretrain(task, data)[0].save(path)
        for spec in specs:
            accuracy, seconds, trainable = [], [], 0
            for seed in seeds:
                keras.utils.set_random_seed(seed)
                model, lr = build(spec, keras.saving.load_model(path), data)
                model.compile(
                    keras.optimizers.Adam(lr),
                    "sparse_categorical_crossentropy",
                    metrics=["accuracy"],
                )
                start = time.perf_counter()
                model.fit(x, y, epochs=epochs, batch_size=transfer.BATCH, verbose=0)
                seconds.append(time.perf_counter() - start)
                metrics = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
                accuracy.append(metrics["accuracy"])
                trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
            rows[spec] = (
                float(np.mean(accuracy)),
                float(np.std(accuracy)),
                trainable,
                float(np.median(seconds)),
            )
            mean, sd, n, fit = rows[spec]
            print(
                f"{task:18s} {spec:22s} float accuracy {mean:.3f} ± {sd:.3f}  "
                f"trainable {n:6d}  fit {fit:.1f} s",
                flush=True,
            )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=tasks.TASKS)
    parser.add_argument("specs", help="comma-separated placements (module docs)")
    parser.add_argument("--epochs", type=int, default=transfer.EPOCHS)
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sweep(args.task, args.specs.split(","), range(args.seeds), args.epochs)


if __name__ == "__main__":
    main()
