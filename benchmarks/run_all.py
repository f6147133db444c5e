"""`make bench`: run every benchmark table and write BENCHMARKS.md.

Each table script runs in its own process (its own memory peak, no state
shared between tables); its stdout is the table. Scripts that do not exist yet
are skipped.

    python -m benchmarks.run_all [--tiny] [--output BENCHMARKS.md] [--only MODULE ...]

With `--only`, an existing output file keeps its other tables and only the
named ones are replaced (marked as re-run on their own, with the date).
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (table number, title, module, reading for tables that do not compute one).
TABLES = (
    ("1", "Conversion quality: ours vs the plain TFLite converter", "conversion", ""),
    (
        "2",
        "Transfer suite: microtuning vs full fine-tuning on five bundled tasks",
        "transfer",
        "",
    ),
    (
        "3",
        "Where PTQ hurts: float, Keras/TFLite/ours PTQ, QAT and "
        'precision="auto", measured in TFLite Micro',
        "quantization",
        "",
    ),
    ("4", "Runtime speed: LiteRT CPU and Ethos-U55 (Vela)", "runtime_speed", ""),
    (
        "5",
        "Overheads: callbacks' step and fit time vs the same training without",
        "callbacks_overhead",
        "Target: step ratio under 1.03 for the schedule callbacks. The first "
        "row is plain against plain: its distance from 1.00 is the noise floor "
        "of this shared machine, and a ratio that close to 1.00 is no "
        "measurable cost. Each row "
        "compares against the same wrapped model (QAT, pruning, Distiller) "
        "without the callback; ActivationClipAnneal against the same ReLUs with "
        "a fixed `max_value` (Keras' own clip; against unclipped ReLUs its extra "
        "clip op measured 1.12); ProgressiveUnfreeze against the plain Keras way "
        "(fit, unfreeze, recompile, fit again). DeviceBudget's step ratio shows "
        "whether it slows the training steps; its fit ratio is its conversions "
        "(own time, one per epoch here) plus the rest in the last column.",
    ),
    (
        "6",
        "4-bit weight storage: clustering + TFLite Micro LUT compression",
        "compression",
        "Goal: flash at most 0.65x of plain int8 with int8 accuracy within 0.5 "
        "points. Decoded weights live in the arena, so compression trades RAM "
        "for flash.",
    ),
    (
        "7",
        "Patch-based inference: TFLite Micro arena of the zoo, plain and patched",
        "patching",
        "Goal: MobileNetV2(0.35) 96x96 arena at most 0.5x the plain path's "
        "with at most +20% MACs, and no zoo model above the plain path. The "
        "arena is TFLite Micro's activation head plus its tail (per-channel "
        "quantization data, op and tensor structs); patching lowers the head "
        "and copies each patched op's part of the tail.",
    ),
    (
        "8",
        "Sequence models on BasicMotions: LSTM, GRU, streaming, tiny "
        "transformer vs Conv1D",
        "sequence",
        "Target: int8 TFLite Micro accuracy within 1 point of float for each "
        "model (40 test sequences: one sequence is 2.5 points). The fused LSTM "
        "costs about what the Conv1D does; the unrolled GRU pays one graph step "
        "per time step in flash and arena; the tiny transformer's attention "
        "over 100 steps needs the largest arena after the unrolled GRU.",
    ),
    (
        "9",
        "Backends: the same QAT microtuning on JAX and TensorFlow",
        "backends",
        "Step: median train-step time of the QAT fit after its first two "
        "epochs (compilation left out), each backend in its own process, one "
        "after the other on the same machine. JAX converts through a "
        "TensorFlow child process, which its convert time includes.",
    ),
)
# Tables whose script computes its own reading (`--json`).
JSON_READING = (
    "compression",
    "conversion",
    "quantization",
    "runtime_speed",
    "transfer",
)
_NOISE = (
    "fully_quantize:",
    "INFO: ",
    "WARNING",
    "W0000",
    "I0000",
    "E0000",
    "Saved artifact",
)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    ram = "?"
    try:
        with open("/proc/cpuinfo") as f:
            models = [ln.split(":", 1)[1].strip() for ln in f if "model name" in ln]
        cpu = models[0] if models else cpu
        with open("/proc/meminfo") as f:
            kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal"))
        ram = f"{kib / 1024**2:.1f} GiB"
    except (OSError, StopIteration):
        pass
    import tensorflow as tf  # noqa: F401 - versions for the record

    return (
        f"{os.cpu_count()} CPUs ({cpu}), {ram} RAM, {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}, "
        f"TensorFlow {tf.__version__}"
    )


def _clean(stdout: str) -> str:
    lines = [ln for ln in stdout.splitlines() if not ln.startswith(_NOISE)]
    return "\n".join(lines).strip()


def run_table(module: str, tiny: bool, timeout: int | None = None) -> dict:
    """Run `benchmarks.<module>` in a child process; its table and timing."""
    cmd = [sys.executable, "-m", f"benchmarks.{module}"] + (["--tiny"] if tiny else [])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = os.path.join(tmp, "rows.json")
        if module in JSON_READING:
            cmd += ["--json", rows_path]
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        out = {
            "command": f"python -m benchmarks.{module}" + (" --tiny" if tiny else ""),
            "seconds": time.perf_counter() - start,
            "returncode": proc.returncode,
            "table": _clean(proc.stdout),
            "reading": "",
        }
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-5:]
            out["table"] += "\n\nFAILED:\n```\n" + "\n".join(tail) + "\n```"
        elif os.path.exists(rows_path):
            with open(rows_path) as f:
                out["reading"] = json.load(f)["reading"]
    return out


def available(module: str) -> bool:
    return importlib.util.find_spec(f"benchmarks.{module}") is not None


def section(number, title, reading, result, started=None) -> str:
    """The markdown of one table; `started` notes a table re-run on its own."""
    lines = [f"## Table {number}: {title}", ""]
    if started:
        lines += [f"Re-run on its own on {started} (`--only`).", ""]
    lines += [f"`{result['command']}` ({result['seconds']:.0f} s)", ""]
    lines += [result["table"], ""]
    text = result["reading"] or reading
    if text:
        lines += [f"Reading: {text}", ""]
    return "\n".join(lines)


def splice(text: str, results: list, started: str) -> str:
    """Replace the sections of the tables in `results` in an existing file."""
    parts = re.split(r"(?m)^(?=## Table )", text)
    head, sections = parts[0], parts[1:]
    by_number = {}
    for part in sections:
        by_number[part.split(":", 1)[0].removeprefix("## Table ").strip()] = part
    for number, title, _, reading, result in results:
        by_number[number] = section(number, title, reading, result, started) + "\n"
    ordered = [by_number[n] for n in sorted(by_number, key=int)]
    return head + "".join(ordered).rstrip("\n") + "\n"


def markdown(results: list, tiny: bool, started: str, description: str) -> str:
    mode = " --tiny" if tiny else ""
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `python -m benchmarks.run_all{mode}` (`make bench`) on "
        f"{started}.",
        "",
        f"Machine: {description}. The machine is shared with other jobs: every "
        "speed figure is a ratio to a baseline measured in the same run (median "
        "of several runs); sizes, arena bytes, op counts and Vela cycles are "
        "deterministic.",
        "",
    ]
    if tiny:
        lines += ["**Smoke mode (`--tiny`): the numbers are not meaningful.**", ""]
    for number, title, _, reading, result in results:
        lines.append(section(number, title, reading, result))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke mode")
    parser.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument(
        "--only", nargs="*", help="table modules to run (default: all that exist)"
    )
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC"
    )
    results = []
    for number, title, module, reading in TABLES:
        if not available(module) or (args.only and module not in args.only):
            continue
        print(f"table {number}: benchmarks.{module} ...", flush=True)
        result = run_table(module, args.tiny)
        print(f"  {result['seconds']:.0f} s, exit {result['returncode']}", flush=True)
        results.append((number, title, module, reading, result))
    if args.only and os.path.exists(args.output) and not args.tiny:
        # Keep the other tables; replace only the ones that ran.
        with open(args.output) as f:
            text = splice(f.read(), results, started)
    else:
        text = markdown(results, args.tiny, started, machine())
    with open(args.output, "w") as f:
        f.write(text)
    print(f"wrote {args.output}")
    return 0 if all(r[-1]["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
