"""`fit` wall time with the frozen-prefix cache, on the digits transfer task.

Pretrain the demo backbone on digits 0-4 (as the demo does), then time
`model.fit` on digits 5-9 with 20 shots per class, side by side in one
process, for: `attach(groups=2)` with the prefix cache (the default),
the same model with `cache_prefix=False`, and full fine-tuning
(`attach(adapters=None, freeze=False)`). Same epochs and batch size; the
wall time includes tracing and, for the cached model, computing the prefix.
Median of `--repeats` rounds.

    python -m benchmarks.cached_fit [--tiny] [--repeats 3]
"""

import argparse
import time


def _model(kind, backbone):
    import keras_microtune as kmt

    if kind == "full fine-tuning":
        return kmt.attach(backbone, num_classes=5, adapters=None, freeze=False)
    model = kmt.attach(backbone, num_classes=5, groups=2)
    model.cache_prefix = kind == "attach, cached"
    return model


def run(tiny=False, repeats=3):
    import keras
    import numpy as np

    from keras_microtune import data, demo

    epochs = {"pretrain": 1, "fit": 2} if tiny else {"pretrain": 20, "fit": 40}
    keras.utils.set_random_seed(0)
    digits = data.load_digits_transfer(shots=20)
    (x_src, y_src), (x, y) = digits["source"], digits["train"]
    x_test, y_test = digits["test"]
    backbone = demo.build_backbone()
    backbone.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    backbone.fit(x_src, y_src, epochs=epochs["pretrain"], batch_size=32, verbose=0)
    kinds = ("attach, cached", "attach, uncached", "full fine-tuning")
    times = {kind: [] for kind in kinds}
    accuracy = {}
    for _ in range(repeats):
        for kind in kinds:
            keras.utils.set_random_seed(1)
            model = _model(kind, backbone)
            model.compile(
                keras.optimizers.Adam(1e-2),
                "sparse_categorical_crossentropy",
                metrics=["accuracy"],
            )
            start = time.perf_counter()
            model.fit(x, y, epochs=epochs["fit"], batch_size=16, verbose=0)
            times[kind].append(time.perf_counter() - start)
            accuracy[kind] = model.evaluate(x_test, y_test, verbose=0)[1]
    full = float(np.median(times["full fine-tuning"]))
    print(f"epochs={epochs['fit']} batch_size=16 samples={len(y)} repeats={repeats}")
    print("| method | fit seconds (median) | vs full fine-tuning | float accuracy |")
    print("|---|---|---|---|")
    for kind in kinds:
        median = float(np.median(times[kind]))
        ratio = median / full
        print(f"| {kind} | {median:.2f} | {ratio:.2f}x | {accuracy[kind]:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run(tiny=args.tiny, repeats=args.repeats)


if __name__ == "__main__":
    main()
