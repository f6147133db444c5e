"""`keras-microtune`: convert, inspect and list targets from the command line.

Exit codes: 0 ok; 1 the model does not fit or verification failed; 2 bad input
(one line on stderr; `--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _print_result(result, as_json: bool) -> int:
    from keras_microtune.export import report as report_lib

    if as_json:
        print(json.dumps(result.report, indent=2))
    else:
        print(report_lib.text(result.report))
    ok = result.fits and result.report["verified"]
    return EXIT_OK if ok else EXIT_FAILED


def cmd_convert(args) -> int:
    from keras_microtune.export import convert
    from keras_microtune.export.converter import check_output_dir

    if args.project and not args.output:
        raise ValueError("--project needs an output folder: add -o DIR.")
    if args.output:  # Fail before the (slow) conversion.
        check_output_dir(args.output, args.overwrite)
    result = convert(
        args.model,
        args.target,
        representative_data=args.calibration,
        validation_data=args.validation,
        safe_mode=not args.unsafe_deserialization,
        verbose=0 if args.json else 1,
        train_batch_size=args.train_batch_size,
        patch_inference=args.patch_inference,
    )
    if args.output:
        real = result.save(args.output, overwrite=args.overwrite, project=args.project)
        link = os.path.realpath(args.output) != os.path.abspath(args.output)
        via = f" (-o {args.output!r} resolves to it through a symbolic link)"
        via = via if link else ""
        print(f"keras-microtune: wrote {real}{via}", file=sys.stderr)
    return _print_result(result, args.json)


def patch_option(text: str):
    """`--patch-inference` as `convert(patch_inference=...)`: `auto`, `UNTIL`
    (the grid picked by measured arena) or `UNTIL:ROWSxCOLS`."""
    if text == "auto":
        return "auto"
    until, sep, grid = text.rpartition(":")
    if not sep:
        return {"until": text, "grid": "auto"}
    rows, x, cols = grid.lower().partition("x")
    if not (until and x and rows.isdigit() and cols.isdigit()):
        raise argparse.ArgumentTypeError(
            "expected auto, a layer name, or LAYER:ROWSxCOLS (e.g. "
            f"block_1_project_BN:3x3); received {text!r}"
        )
    return {"until": until, "grid": (int(rows), int(cols))}


def cmd_inspect(args) -> int:
    from keras_microtune.export import inspect

    return _print_result(inspect(args.model, target=args.target), args.json)


def cmd_targets(args) -> int:
    from keras_microtune.export import targets

    rows = targets.table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK

    def size(n):
        return "-" if n is None else f"{n // 1024} KiB"

    header = ("name", "runtime", "quantization", "io", "RAM", "flash", "description")
    table = [header] + [
        (
            r["name"],
            r["runtime"],
            r["quantization"],
            r["io_dtype"],
            size(r["ram_bytes"]),
            size(r["flash_bytes"]),
            r["description"],
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from keras_microtune.export.evaluate import evaluate

    metrics = evaluate(args.model, args.data, runtime=args.runtime, verbose=0)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return EXIT_OK
    for key, value in metrics.items():
        if key == "confusion_matrix":
            print("confusion_matrix (rows: true, columns: predicted):")
            for row in value:
                print("  " + " ".join(f"{v:5d}" for v in row))
        elif isinstance(value, list):
            print(f"{key}: " + " ".join(f"{v:.4f}" for v in value))
        elif isinstance(value, float):
            print(f"{key}: {value:.4f}")
        else:
            print(f"{key}: {value}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from keras_microtune import demo

    demo.run(args.output, quick=args.quick or None)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-microtune",
        description="Convert Keras models to verified TFLite / TFLite Micro.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a model for a target")
    p.add_argument("model", help=".keras, .h5 or SavedModel folder")
    p.add_argument("--target", "-t", default="mcu", help="see `targets`")
    p.add_argument("--calibration", help="representative inputs (.npz/.npy)")
    p.add_argument("--validation", help="validation .npz (x, y) for parity")
    p.add_argument("-o", "--output", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace -o if not empty")
    p.add_argument(
        "--project",
        action="store_true",
        help="also write the TFLite Micro application template into -o",
    )
    p.add_argument(
        "--unsafe-deserialization",
        action="store_true",
        help="allow Lambda layers (runs code from the model file)",
    )
    p.add_argument(
        "--train-batch-size",
        type=int,
        default=None,
        help="--target mobile-trainable: the train signature's batch (default 16)",
    )
    p.add_argument(
        "--patch-inference",
        type=patch_option,
        default=None,
        metavar="auto|LAYER[:ROWSxCOLS]",
        help="TFLite Micro targets: run the model up to LAYER on a grid of "
        "patches to cut the arena (auto: split and grid by measured arena)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="report on an existing .tflite")
    p.add_argument("model", help=".tflite file")
    p.add_argument("--target", "-t", default=None, help="budgets to check")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("targets", help="list the targets")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("evaluate", help="metrics of a model on labelled data")
    p.add_argument("model", help=".tflite (or .keras) model")
    p.add_argument("--data", required=True, help=".npz with x and y")
    p.add_argument(
        "--runtime",
        choices=("tflm", "litert", "keras"),
        default=None,
        help="default: tflm for .tflite, keras for .keras",
    )
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="run the end-to-end demo")
    p.add_argument("-o", "--output", default="build/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a few-second smoke run")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from keras_microtune.export.converter import DoesNotFitError, VerificationError

    try:
        return args.func(args)
    except (DoesNotFitError, VerificationError) as e:
        if args.debug:
            raise
        print(f"keras-microtune: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, TypeError, OSError, ImportError) as e:
        if args.debug:
            raise
        print(f"keras-microtune: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("keras-microtune: interrupted", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
