"""Child process that runs TFLite Micro, so a crash cannot kill the caller.

Run by path (not as a package module) so it imports only numpy and tflite_micro:

    python _tflm_worker.py arena MODEL LOW HIGH INPUTS.npz
    python _tflm_worker.py run MODEL ARENA N_OUTPUTS INPUTS.npz OUTPUTS.npz
    python _tflm_worker.py stream MODEL ARENA N_OUTPUTS INPUTS.npz OUTPUTS.npz
    python _tflm_worker.py time MODEL ARENA MODEL_B ARENA_B INPUTS.npz REPEATS
    python _tflm_worker.py record LIST ARENA

`arena` prints one line per probe (`probe SIZE ok|fail`) and then
`result SIZE`; the parent resumes from the printed probes if this process dies.
`run` writes one array per output (`out0`, ...) stacked over the samples.
`stream` feeds each sample `(T, ...)` one frame per invoke, resets the
interpreter (and so the resource variables) between samples, and writes
outputs `(N, T, ...)`.
`time` invokes the two models in turn and prints `time MEDIAN_S MEDIAN_B_S`.
`record` allocates each model named in LIST (one path a line) in an arena of
ARENA bytes and prints, on stderr, `record K begin`, then `record K` and the
recording allocator's lines for it (`record K fail` when it does not allocate).
"""

import sys
import time

import numpy as np


def _interpreter(model, arena):
    from tflite_micro.python.tflite_micro import runtime

    return runtime.Interpreter.from_bytes(model, arena_size=int(arena))


def _invoke(interp, inputs, sample):
    for i in range(len(inputs)):
        interp.set_input(inputs[f"in{i}"][sample : sample + 1], i)
    interp.invoke()


def _works(model, arena, inputs, invoke=False):
    """True when the interpreter allocates (and, if asked, invokes) in `arena`."""
    try:
        interp = _interpreter(model, arena)
        if invoke:
            _invoke(interp, inputs, 0)
        return True
    except RuntimeError:
        return False


def arena(model, low, high, inputs):
    """Bisect the smallest working arena in (low, high], 16-byte resolution."""
    low, high = int(low), int(high)
    if not _works(model, high, inputs, invoke=True):
        print(f"result none {high}", flush=True)
        return
    while high - low > 16:
        mid = (low + high) // 2 // 16 * 16
        if mid <= low:
            break
        ok = _works(model, mid, inputs)
        print(f"probe {mid} {'ok' if ok else 'fail'}", flush=True)
        low, high = (low, mid) if ok else (mid, high)
    # Allocation is where the arena is used; confirm the size also invokes.
    while not _works(model, high, inputs, invoke=True):
        high += 16
    print(f"result {high}", flush=True)
    interp = _interpreter(model, high)
    _invoke(interp, inputs, 0)
    sys.stdout.flush()
    interp.print_allocations()  # Recording allocator: head/tail lines.


def run(model, arena_size, n_outputs, inputs, out_path):
    interp = _interpreter(model, arena_size)
    outputs = {f"out{k}": [] for k in range(int(n_outputs))}
    for s in range(len(inputs["in0"])):
        _invoke(interp, inputs, s)
        for k in range(int(n_outputs)):
            outputs[f"out{k}"].append(np.array(interp.get_output(k)))
        interp.reset()
    np.savez(out_path, **{k: np.concatenate(v) for k, v in outputs.items()})


def stream(model, arena_size, n_outputs, inputs, out_path):
    interp = _interpreter(model, arena_size)
    sequences = inputs["in0"]
    outputs = {f"out{k}": [] for k in range(int(n_outputs))}
    for sequence in sequences:
        steps = {k: [] for k in outputs}
        for frame in sequence:
            interp.set_input(frame[None], 0)
            interp.invoke()
            for k in range(int(n_outputs)):
                steps[f"out{k}"].append(np.array(interp.get_output(k)))
        for k in outputs:
            outputs[k].append(np.stack(steps[k], axis=1))
        interp.reset()
    np.savez(out_path, **{k: np.concatenate(v) for k, v in outputs.items()})


def timing(models, arenas, inputs, repeats):
    """Median invoke seconds of each model, invoked alternately on sample 0."""
    interps = [_interpreter(m, a) for m, a in zip(models, arenas)]
    times = [[] for _ in interps]
    for _ in range(int(repeats)):
        for interp, spent in zip(interps, times):
            for i in range(len(inputs)):
                interp.set_input(inputs[f"in{i}"][0:1], i)
            start = time.perf_counter()
            interp.invoke()
            spent.append(time.perf_counter() - start)
    print("time", *(float(np.median(t)) for t in times), flush=True)


def record(paths, arena_size):
    """Allocate each model once and print the recording allocator's figures:
    head and tail do not depend on the arena size once it is large enough."""
    for k, path in enumerate(paths):
        with open(path, "rb") as f:
            model = f.read()
        print(f"record {k} begin", file=sys.stderr, flush=True)
        try:
            interp = _interpreter(model, arena_size)
        except RuntimeError:
            print(f"record {k} fail", file=sys.stderr, flush=True)
            continue
        print(f"record {k}", file=sys.stderr, flush=True)
        interp.print_allocations()
        sys.stderr.flush()


def main(argv):
    command, model_path = argv[1], argv[2]
    if command == "record":
        with open(model_path) as f:
            record(f.read().split(), argv[3])
        return
    with open(model_path, "rb") as f:
        model = f.read()
    if command == "arena":
        with np.load(argv[5], allow_pickle=False) as inputs:
            arena(model, argv[3], argv[4], dict(inputs))
    elif command in ("run", "stream"):
        with np.load(argv[5], allow_pickle=False) as inputs:
            fn = run if command == "run" else stream
            fn(model, argv[3], argv[4], dict(inputs), argv[6])
    elif command == "time":
        with open(argv[4], "rb") as f:
            other = f.read()
        with np.load(argv[6], allow_pickle=False) as inputs:
            timing([model, other], [argv[3], argv[5]], dict(inputs), argv[7])
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv)
