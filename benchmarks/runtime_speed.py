"""Table 4: runtime speed. LiteRT CPU latency and Ethos-U55 (Vela) throughput.

Each zoo model is converted three times with `kmt.convert`: full int8 (`mcu`),
`float32` and `mobile-float16`. LiteRT runs each on one CPU thread; a timed
block is `--invokes` invocations after a warm-up, and the latency is the median
block over `--runs` repeats, the three models interleaved so that machine load
hits them alike. Latencies are reported as ratios to float32 (the absolute
float32 figure is given for scale only: the machine is shared). The int8 model
is then compiled by Arm Vela for Ethos-U55-128: its cycles and inferences/s
are deterministic estimates from Vela's performance model.

    python -m benchmarks.runtime_speed [--tiny] [--runs N]
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TINY_MODELS = ("ds_cnn", "four_stages")
TARGETS = {"int8": "mcu", "float32": "float32", "float16": "mobile-float16"}


def _interpreter(tflite):
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=tflite, num_threads=1)
    interp.allocate_tensors()
    for d in interp.get_input_details():
        interp.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    interp.invoke()  # Warm-up.
    return interp


def _block(interp, invokes):
    start = time.perf_counter()
    for _ in range(invokes):
        interp.invoke()
    return (time.perf_counter() - start) / invokes


def measure(name, runs, invokes):
    import keras_microtune as kmt
    from benchmarks import zoo
    from keras_microtune.export import vela

    model, x = zoo.build(name, samples=16)
    models = {
        kind: kmt.convert(model, target, representative_data=x, verbose=0).tflite
        for kind, target in TARGETS.items()
    }
    interps = {kind: _interpreter(m) for kind, m in models.items()}
    times = {kind: [] for kind in models}
    for _ in range(runs):
        for kind, interp in interps.items():
            times[kind].append(_block(interp, invokes))
    row = {"model": name, **{k: statistics.median(v) for k, v in times.items()}}
    try:
        compiled = vela.compile_model(models["int8"], "ethos-u55-128")
        row["vela"] = {k: v for k, v in compiled.items() if k != "tflite"}
    except (ImportError, RuntimeError) as e:
        row["vela"] = {"error": str(e)[:80]}
    return row


def table(rows, runs, invokes):
    lines = [
        f"LiteRT, 1 thread, median of {runs} blocks of {invokes} invocations; "
        "Vela: ethos-u55-128, default system config.",
        "",
        "| model | float32 latency (ms) | int8 / float32 | float16 / float32 "
        "| Vela NPU / CPU ops | Vela cycles | Vela inferences/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v = r["vela"]
        if "error" in v:
            vela_cells = f"- | - | {v['error']}"
        else:
            vela_cells = (
                f"{v['npu_ops']} / {v['cpu_ops']} | {v['cycles']:,} "
                f"| {v['inferences_per_second']:,.1f}"
            )
        lines.append(
            f"| {r['model']} | {1e3 * r['float32']:.3f} "
            f"| {r['int8'] / r['float32']:.2f} | {r['float16'] / r['float32']:.2f} "
            f"| {vela_cells} |"
        )
    return "\n".join(lines)


def run(tiny=False, runs=None, invokes=None):
    from benchmarks import zoo

    names = TINY_MODELS if tiny else tuple(zoo.ZOO)
    runs = runs or (1 if tiny else 7)
    invokes = invokes or (2 if tiny else 20)
    rows = []
    for name in names:
        try:
            rows.append(measure(name, runs, invokes))
        except ValueError as e:  # A model a target cannot convert or run.
            print(f"{name}: skipped ({str(e)[:100]})")
    return table(rows, runs, invokes), rows


def reading(rows):
    """A few sentences on what the rows show."""
    if not rows:
        return "No model could be measured."
    int8 = sorted((r["int8"] / r["float32"], r["model"]) for r in rows)
    half = statistics.median(r["float16"] / r["float32"] for r in rows)
    middle = statistics.median(ratio for ratio, _ in int8)
    out = [
        f"LiteRT on this x86 CPU: int8 latency is {int8[0][0]:.2f}x "
        f"({int8[0][1]}) to {int8[-1][0]:.2f}x ({int8[-1][1]}) of float32, "
        f"median {middle:.2f}x; XNNPACK's float kernels are strong on small "
        "models, so int8's gain on a desktop CPU is modest next to its 4x "
        f"smaller weights. float16 runs at {half:.2f}x float32 (median): its "
        "weights are dequantized to float32 when the model loads, so it only "
        "halves the file size."
    ]
    vela = [r for r in rows if "error" not in r["vela"]]
    if vela:
        fast = max(vela, key=lambda r: r["vela"]["inferences_per_second"])
        on_cpu = [r["model"] for r in vela if r["vela"]["cpu_ops"]]
        out.append(
            f"On Ethos-U55-128, Vela estimates from "
            f"{min(r['vela']['inferences_per_second'] for r in vela):,.0f} to "
            f"{fast['vela']['inferences_per_second']:,.0f} inferences/s "
            f"({fast['model']} fastest)"
            + (
                "; ops left on the CPU: " + ", ".join(on_cpu) + "."
                if on_cpu
                else "; every op runs on the NPU."
            )
        )
    return " ".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke mode")
    parser.add_argument("--runs", type=int, default=None, help="timed blocks")
    parser.add_argument("--invokes", type=int, default=None, help="per block")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    text, rows = run(args.tiny, args.runs, args.invokes)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "reading": reading(rows)}, f, indent=1)


if __name__ == "__main__":
    main()
