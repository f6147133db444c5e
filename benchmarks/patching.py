"""Table 7: patch-based inference on the zoo, measured in TFLite Micro.

For each zoo model: `kmt.convert(model, "mcu")` against the same call with
`patch_inference="auto"` (split layer and grid chosen by measured arena under
+20% MACs). Columns: arena of both (TFLite Micro, bytes), of which TFLite
Micro's activation head and its tail (per-channel multipliers and shifts,
node and tensor structs: arena minus head), the chosen stage end and grid,
MAC overhead, invoke time patched / plain (TFLite Micro, median of 20
alternating invokes), whether the int8 outputs are bit-identical in TFLite
Micro, and conversion seconds.

    python -m benchmarks.patching [--tiny] [--models NAME ...]
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TINY_MODELS = ("ds_cnn", "four_stages")


def measure(name):
    import numpy as np

    import keras_microtune as kmt
    from benchmarks import zoo
    from keras_microtune.export import runtimes

    model, x = zoo.build(name)
    plain = kmt.convert(model, "mcu", representative_data=x, verbose=0)
    start = time.perf_counter()
    ours = kmt.convert(
        model, "mcu", representative_data=x, verbose=0, patch_inference="auto"
    )
    seconds = time.perf_counter() - start
    rep = ours.report["patch_inference"]
    row = {
        "model": name,
        "plain_arena": plain.arena_bytes,
        "plain_head": plain.report["memory"].get("head_bytes"),
        "arena": ours.arena_bytes,
        "head": ours.report["memory"].get("head_bytes"),
        "applied": rep["applied"],
        "until": rep.get("until"),
        "grid": rep.get("grid"),
        "mac_overhead": rep.get("mac_overhead", 0.0),
        "invoke_time_ratio": rep.get("invoke_time_ratio"),
        "reason": rep.get("reason"),
        "seconds": round(seconds, 1),
        "verified": ours.report["verified"],
    }
    rng = np.random.default_rng(0)
    shape = plain._info().tensors[plain._info().inputs[0]].shape[1:]
    q = [rng.integers(-128, 128, (4, *shape)).astype("int8")]
    a = runtimes.tflm_run(plain.tflite, q, plain.arena_bytes)
    b = runtimes.tflm_run(ours.tflite, q, ours.arena_bytes)
    row["bit_exact"] = all(np.array_equal(u, v) for u, v in zip(a, b))
    return row


def _kb(n):
    return "-" if n is None else f"{n:,}"


def table(rows):
    lines = [
        "| model | arena plain (B) | arena patched (B) | ratio | activation head "
        "plain / patched (B) | TFLM tail plain / patched (B) | stage until | grid "
        "| MACs | invoke time x | TFLM int8 bit-exact | convert s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        grid = "x".join(map(str, r["grid"])) if r["grid"] else "-"
        until = r["until"] if r["applied"] else f"not applied ({r['reason']})"
        time_x = f"{r['invoke_time_ratio']:.2f}" if r["invoke_time_ratio"] else "-"
        lines.append(
            f"| {r['model']} | {_kb(r['plain_arena'])} | {_kb(r['arena'])} "
            f"| {r['arena'] / r['plain_arena']:.2f} | {_kb(r['plain_head'])} / "
            f"{_kb(r['head'])} | {_kb(r['plain_arena'] - r['plain_head'])} / "
            f"{_kb(r['arena'] - r['head'])} | {until} | {grid} "
            f"| +{100 * r['mac_overhead']:.1f}% "
            f"| {time_x} | {'yes' if r['bit_exact'] else 'NO'} | {r['seconds']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    from benchmarks import zoo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke mode")
    parser.add_argument("--models", nargs="*", help="zoo names (default: all)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    names = args.models or (TINY_MODELS if args.tiny else tuple(zoo.ZOO))
    rows = []
    for name in names:
        rows.append(measure(name))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # Progress.
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
