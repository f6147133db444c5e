"""Child process that runs TFLite Micro, so a crash cannot kill the caller.

Run by path (not as a package module) so it imports only numpy and tflite_micro:

    python _tflm_worker.py arena MODEL LOW HIGH INPUTS.npz
    python _tflm_worker.py run MODEL ARENA N_OUTPUTS INPUTS.npz OUTPUTS.npz

`arena` prints one line per probe (`probe SIZE ok|fail`) and then
`result SIZE`; the parent resumes from the printed probes if this process dies.
`run` writes one array per output (`out0`, ...) stacked over the samples.
"""

import sys

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


def main(argv):
    command, model_path = argv[1], argv[2]
    with open(model_path, "rb") as f:
        model = f.read()
    if command == "arena":
        with np.load(argv[5], allow_pickle=False) as inputs:
            arena(model, argv[3], argv[4], dict(inputs))
    elif command == "run":
        with np.load(argv[5], allow_pickle=False) as inputs:
            run(model, argv[3], argv[4], dict(inputs), argv[6])
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv)
