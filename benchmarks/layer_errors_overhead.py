"""Per-layer error: what the `layer_errors` pass adds to `kmt.convert` time.

For each zoo model, `kmt.convert(model, "mcu")` (32 calibration samples,
the layer errors measured on them); the pass's wall seconds against the
rest of the conversion (median of N runs in this process).

    python -m benchmarks.layer_errors_overhead [--runs N] [--models a,b]
"""

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--models", default="ds_cnn,resnet8,mobilenet_v1,four_stages")
    args = parser.parse_args(argv)
    import keras_microtune as kmt
    from benchmarks import zoo

    print("| model | layers | conversion s (without) | layer_errors s | ratio |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        model, x = zoo.build(name)
        rest, own, rows = [], [], 0
        for _ in range(args.runs):
            result = kmt.convert(model, "mcu", representative_data=x, verbose=0)
            t = result.timings
            own.append(t["layer_errors"])
            rest.append(sum(t.values()) - t["layer_errors"])
            rows = len(result.report["layer_errors"])
        r, o = statistics.median(rest), statistics.median(own)
        print(f"| {name} | {rows} | {r:.2f} | {o:.2f} | {o / r:.2f} |", flush=True)


if __name__ == "__main__":
    main()
