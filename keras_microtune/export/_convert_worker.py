"""Child process of `backend_bridge`: the ordinary conversion under TensorFlow.

    KERAS_BACKEND=tensorflow python -m keras_microtune.export._convert_worker DIR

`DIR/args.json` names the saved model, the target and `convert`'s options;
the data are `.npz` files beside it. Writes `DIR/model.tflite` and
`DIR/out.json` (report, name, timings), or `DIR/error.json` (the exception's
type and message) when the conversion raises.
"""

import json
import os
import sys

import numpy as np

from keras_microtune.export import converter, targets


def _load_data(entry):
    if entry is None:
        return None
    if "path" in entry:
        return entry["path"]
    with np.load(entry["arrays"], allow_pickle=False) as f:
        xs = [f[f"in{i}"] for i in range(entry["inputs"])]
        y = f["y"] if entry["labels"] else None
    x = xs[0] if len(xs) == 1 else xs
    return x if y is None else (x, y)


def _child(tmp):
    """Run the ordinary conversion on the saved model (KERAS_BACKEND=tensorflow)."""
    with open(os.path.join(tmp, "args.json")) as f:
        args = json.load(f)
    try:
        result = converter.convert(
            args["model"],
            targets.Target(**args["target"]),
            representative_data=_load_data(args["representative_data"]),
            validation_data=_load_data(args["validation_data"]),
            **args["options"],
        )
    except Exception as e:  # Raised again, same type and message, in the parent.
        with open(os.path.join(tmp, "error.json"), "w") as f:
            json.dump({"type": type(e).__name__, "message": str(e)}, f)
        raise
    with open(os.path.join(tmp, "model.tflite"), "wb") as f:
        f.write(result.tflite)
    with open(os.path.join(tmp, "out.json"), "w") as f:
        json.dump(
            {"report": result.report, "name": result.name, "timings": result.timings},
            f,
        )


if __name__ == "__main__":
    _child(sys.argv[1])
