"""``cbam-dsa bench``: time the block against timm's CBAM and SE (see :mod:`cbam_dsa.bench` and
``benchmarks/README.md`` for the method): the eager operator, its no-compiler path, the reference path and the
compiled block, timm's modules eager and compiled, the operator's per-call overhead and a resnet50 training step.

Prints a table, and writes the results as JSON, the table as text and a PNG chart into ``--out``; with
``--markdown`` also writes ``docs/BENCHMARKS.md`` from this run and any earlier result files given with
``--with-results`` (for example a GPU run). ``--render FILE...`` measures nothing and only renders result
files.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

HELP = "Benchmark the block against timm's CbamModule and SEModule (time, saved tensors, memory, overhead, resnet50)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds, no compilation (seconds)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds per figure (default: 16, quick: 2)")
    parser.add_argument(
        "--network-rounds", type=int, help="interleaved rounds of the resnet50 step (default: 21, quick: 1)"
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        metavar="B,C,H,W",
        help="input shapes (default: 16,64,56,56 8,256,28,28 32,512,7,7; quick: two tiny ones)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip every torch.compile contender")
    parser.add_argument("--no-network", action="store_true", help="skip the resnet50 training-step comparison")
    parser.add_argument(
        "--network-compile",
        action="store_true",
        help="also time the compiled resnet50 steps (plain, SE, CBAM, ours; compiling them takes 4 to 10 minutes)",
    )
    parser.add_argument("--network-batch", type=int, help="images per resnet50 step (default: 8, quick: 2)")
    parser.add_argument("--network-size", type=int, help="their height and width (default: 160, quick: 64)")
    parser.add_argument(
        "--network-autocast",
        choices=("bfloat16", "float16"),
        help="run the resnet50 step under torch.autocast to this dtype (mixed precision; default: off)",
    )
    parser.add_argument("--no-overhead", action="store_true", help="skip the operator's per-call overhead")
    parser.add_argument(
        "--no-inputs", action="store_true", help="skip the other inputs (channels_last, strided, float16, bfloat16)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="modules and inputs (default: float32)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on CPU (default: 2, quick: 1)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the weights, the inputs and the rounds' orders (default: 0)"
    )
    parser.add_argument(
        "--system-heap",
        action="store_true",
        help="leave the C allocator at its defaults (glibc then returns freed memory to the system, and a layer's "
        "step alone in a loop may fault on every page of it again, depending on what ran before; see "
        "benchmarks/README.md)",
    )
    parser.add_argument("--out", default="bench-output", metavar="DIR", help="output folder (default: bench-output)")
    parser.add_argument("--markdown", metavar="FILE.md", help="also write the results as Markdown (docs/BENCHMARKS.md)")
    parser.add_argument(
        "--render",
        nargs="+",
        default=[],
        metavar="FILE.json",
        help="measure nothing: print these result files as tables (and write them to --markdown)",
    )
    parser.add_argument(
        "--with-results",
        nargs="+",
        default=[],
        metavar="FILE.json",
        help="earlier result files to add to --markdown after this run (e.g. a GPU run)",
    )


def _load_results(paths: list[str]) -> list[dict]:
    from .errors import UserError

    runs = []
    for path in paths:
        try:
            runs.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"--with-results {path}: cannot read a results file ({error})") from error
        if not {"settings", "machine", "shapes"} <= set(runs[-1]):
            raise UserError(f"--with-results {path}: not a cbam-dsa bench results file")
    return runs


def _shape(text: str) -> tuple[int, int, int, int]:
    from .errors import UserError

    parts = text.split(",")
    if len(parts) != 4 or not all(part.strip().isdigit() and int(part) >= 1 for part in parts):
        raise UserError(f"--shapes takes B,C,H,W with four integers >= 1 (e.g. 16,64,56,56), but got {text!r}")
    return tuple(int(part) for part in parts)  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    from .errors import UserError

    sized = (
        ("--rounds", args.rounds),
        ("--network-rounds", args.network_rounds),
        ("--network-batch", args.network_batch),
        ("--network-size", args.network_size),
    )
    for flag, value in sized:
        if value is not None and value < 1:
            raise UserError(f"{flag} must be an integer >= 1, but got {value}")
    shapes = [_shape(text) for text in args.shapes or []]
    threads = args.threads if args.threads is not None else (1 if args.quick else 2)
    if threads < 1:
        raise UserError(f"--threads must be an integer >= 1, but got {threads}")
    earlier = _load_results(args.with_results)
    if args.with_results and not args.markdown:
        raise UserError("--with-results only adds to --markdown: give --markdown FILE.md too")
    if args.render:
        return _render(_load_results(args.render) + earlier, args.markdown)

    import torch

    from .. import bench

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    try:
        import matplotlib  # noqa: F401
        import timm  # noqa: F401
    except ImportError as error:
        raise UserError(f"the benchmark needs {error.name}: pip install 'cbam-dsa[bench]'") from error

    overrides = {
        "compile": not args.no_compile and not args.quick,
        "network": not args.no_network,
        "network_compile": args.network_compile and not args.no_compile,
        "overhead": not args.no_overhead,
        "inputs": not args.no_inputs,
        "device": args.device,
        "dtype": args.dtype,
        "threads": threads,
        "seed": args.seed,
        "keep_heap": not args.system_heap and not args.quick,
        "extra": {"command": "cbam-dsa bench " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else ""},
    }
    optional = {
        "rounds": args.rounds,
        "network_rounds": args.network_rounds,
        "network_batch": args.network_batch,
        "network_size": args.network_size,
        "network_autocast": args.network_autocast,
        "shapes": shapes or None,
    }
    overrides.update({name: value for name, value in optional.items() if value is not None})
    settings = bench.Settings.quick(**overrides) if args.quick else bench.Settings(**overrides)
    if not settings.extra["command"]:
        settings.extra["command"] = "cbam-dsa bench" + (" --quick" if args.quick else "")

    results = bench.run_benchmark(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(bench.render_table(results), end="")
    paths = bench.write_outputs(results, Path(args.out))
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    if args.markdown:
        _write_markdown([results, *earlier], args.markdown)
    return 0


def _write_markdown(runs: list[dict], path: str) -> None:
    from .. import bench

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(bench.render_markdown(runs))
    print(f"wrote markdown: {path}")


def _render(runs: list[dict], markdown: str | None) -> int:
    from .. import bench
    from .errors import UserError

    for run in runs:
        try:
            print(bench.render_table(run))
        except (KeyError, TypeError, IndexError) as error:
            raise UserError(f"a results file is incomplete ({type(error).__name__}: {error})") from error
    if markdown:
        _write_markdown(runs, markdown)
    return 0
