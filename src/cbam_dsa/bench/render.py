"""The benchmark's reports from its results (a JSON-ready dict): a text table, Markdown, the targets, JSON, a chart.

Nothing here measures; ``cbam-dsa bench --render`` turns saved result files into tables with these functions alone.
Result files written before the operator (contender ``ours_fast``, no ``pairs``) still render.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "render_markdown", "render_table", "render_targets", "write_chart", "write_outputs"]

TARGETS = {
    "eager_forward": 0.55,
    "eager_forward_backward": 0.35,
    "compiled_vs_eager": 1.15,
    "compiled_vs_timm_compiled": 0.5,
    "no_compiler_forward_backward": 0.8,
    "saved_ratio": 0.05,
}
"""The project's targets for the block's default configuration, CPU float32 (time ratios are forward + backward
unless named otherwise):

* ``eager_forward``, ``eager_forward_backward``: the eager operator against timm's ``CbamModule``;
* ``compiled_vs_eager``: ``torch.compile(block, fullgraph=True)`` against the eager block (at most this much slower);
* ``compiled_vs_timm_compiled``: the compiled block against compiled ``CbamModule``;
* ``no_compiler_forward_backward``: the operator without the C kernels (no C compiler) against ``CbamModule``;
* ``saved_ratio``: bytes the eager operator saves for backward, as a fraction of the input's.
"""


def _operator(contenders: dict[str, Any]) -> dict[str, Any] | None:
    return contenders.get("ours_operator", contenders.get("ours_fast"))  # ours_fast: results before the operator


def _ms(summary: dict[str, Any]) -> str:
    return f"{summary['min_ms']:.2f} / {summary['median_ms']:.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


SHAPE_HEADER = [
    "contender",
    "forward ms (min / median)",
    "vs CBAM",
    "fwd+bwd ms (min / median)",
    "vs CBAM",
    "saved MiB (x input)",
    "peak MiB",
    "fwd+bwd page faults",
]
NETWORK_HEADER = ["network", "step ms (min / median)", "overhead vs plain", "parameters", "page faults / step"]


def _rows(entry: dict[str, Any]) -> list[list[str]]:
    rows = []
    for result in entry["contenders"].values():
        saved = (
            "-" if result["saved_bytes"] is None else f"{_mib(result['saved_bytes'])} ({result['saved_ratio']:.3f}x)"
        )
        rows.append(
            [
                result["label"],
                _ms(result["forward"]),
                _ratio(result["forward"]["ratio"]),
                _ms(result["forward_backward"]),
                _ratio(result["forward_backward"]["ratio"]),
                saved,
                _mib(result["peak_bytes"]),
                _count(result.get("page_faults", {}).get("forward_backward")),  # absent in results written before
            ]
        )
    return rows


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _network_rows(network: dict[str, Any]) -> list[list[str]]:
    rows = []
    for result in network["variants"].values():
        overhead = "-" if result["overhead"] is None else f"{100 * result['overhead']:+.1f}%"
        faults = _count(result.get("page_faults"))  # absent in results written before it was measured
        rows.append([result["label"], _ms(result["step"]), overhead, f"{result['parameters'] / 1e6:.2f} M", faults])
    return rows


INPUTS_HEADER = [
    "input",
    "kind",
    "CBAM fwd+bwd ms (min / median)",
    "operator vs CBAM",
    "without C compiler vs CBAM",
    "operator / without C compiler",
]
INPUTS_NOTE = (
    "The C kernels read float32 (or float64), contiguous or channels_last, as it is: on the other inputs the operator"
    " converts the input and the output's gradient to contiguous float32 for them and the results back; its PyTorch"
    " implementation (`CBAM_DSA_NATIVE=0`) converts every one of these inputs so for its full-size passes. *Operator /"
    " without C compiler* is the median over rounds of the operator's time over the PyTorch implementation's: below 1,"
    " the C kernels are the faster."
)


def _inputs_rows(inputs: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for entry in inputs:
        contenders = entry["contenders"]
        rows.append(
            [
                "x".join(map(str, entry["shape"])),
                entry["kind"],
                _ms(contenders["timm_cbam"]["forward_backward"]),
                _ratio(contenders["ours_operator"]["forward_backward"]["ratio"]),
                _ratio(contenders["ours_no_compiler"]["forward_backward"]["ratio"]),
                _ratio(entry["operator_vs_pytorch"]),
            ]
        )
    return rows


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _title(results: dict[str, Any]) -> str:
    settings, machine = results["settings"], results["machine"]
    threads = f"{machine['threads']} thread" + ("s" if machine["threads"] != 1 else "")
    where = machine.get("gpu") if settings["device"] == "cuda" else f"{machine['cpu']}, {threads}"
    return f"{settings['device'].upper()} {settings['dtype']} ({where})"


def render_overhead(overhead: dict[str, Any] | None) -> str | None:
    """One sentence on the operator's per-call overhead (:func:`.measure.measure_overhead`), or ``None``."""
    if not overhead:
        return None
    median = overhead["median_us"]
    kernels = "the C++ kernel over the C kernels" if overhead["fused_kernels"] else "the PyTorch implementation"
    return (
        f"Per-call overhead at {tuple(overhead['shape'])}, one forward under no_grad (median over rounds of "
        f"{overhead['calls_per_sample']} calls each): the block takes {median['block']:.1f} µs, "
        f"`torch.ops.cbam_dsa.block_forward` {median['operator']:.1f} µs and the CPU kernel it dispatches to (the same "
        f"call below the autograd key: {kernels}) {median['implementation']:.1f} µs: "
        f"the operator adds {overhead['operator_overhead_us']:.1f} µs per call "
        f"({100 * overhead['operator_overhead_ratio']:.1f}% of the block's call), the module around it "
        f"{overhead['module_overhead_us']:.1f} µs."
    )


def render_table(results: dict[str, Any]) -> str:
    """The results as plain-text tables (what ``cbam-dsa bench`` prints)."""
    parts = [_title(results)]
    for entry in results["shapes"]:
        parts.append(f"\nshape {tuple(entry['shape'])}, input {_mib(entry['input_bytes'])} MiB")
        parts.append(_text_table(SHAPE_HEADER, _rows(entry)))
        parts += [f"  {name}: skipped ({error})" for name, error in entry["errors"].items()]
    if results.get("inputs"):
        parts.append("\nother inputs, forward + backward")
        parts.append(_text_table(INPUTS_HEADER, _inputs_rows(results["inputs"])))
    overhead = render_overhead(results.get("overhead"))
    if overhead:
        parts.append("\n" + overhead.replace("`", ""))
    if "network" in results:
        network = results["network"]
        parts.append(f"\n{_network_title(network)}")
        parts.append(_text_table(NETWORK_HEADER, _network_rows(network)))
        parts += [f"  {name}: skipped ({error})" for name, error in network.get("errors", {}).items()]
    return "\n".join(parts) + "\n"


def _check(value: float | None, limit: float) -> str:
    return "-" if value is None else f"{value:.3f} {'(met)' if value <= limit else '(missed)'}"


def _ratio_of(result: dict[str, Any] | None, figure: str) -> float | None:
    return None if result is None else result[figure]["ratio"]


def render_targets(results: dict[str, Any]) -> str | None:
    """The project's targets (:data:`TARGETS`) against a run, as Markdown; ``None`` for runs they are not about
    (they are set for CPU float32)."""
    settings = results["settings"]
    if settings["device"] != "cpu" or settings["dtype"] != "float32":
        return None
    rows = []
    for entry in results["shapes"]:
        contenders, pairs = entry["contenders"], entry.get("pairs", {})
        operator = _operator(contenders)
        values = [
            (_ratio_of(operator, "forward"), TARGETS["eager_forward"]),
            (_ratio_of(operator, "forward_backward"), TARGETS["eager_forward_backward"]),
            (pairs.get("ours_compiled/ours_operator", {}).get("forward_backward"), TARGETS["compiled_vs_eager"]),
            (
                pairs.get("ours_compiled/timm_cbam_compiled", {}).get("forward_backward"),
                TARGETS["compiled_vs_timm_compiled"],
            ),
            (
                _ratio_of(contenders.get("ours_no_compiler"), "forward_backward"),
                TARGETS["no_compiler_forward_backward"],
            ),
            (None if operator is None else operator["saved_ratio"], TARGETS["saved_ratio"]),
        ]
        rows.append(["x".join(str(v) for v in entry["shape"]), *(_check(value, limit) for value, limit in values)])
    header = [
        "input",
        f"eager forward vs CBAM (<= {TARGETS['eager_forward']})",
        f"eager fwd+bwd vs CBAM (<= {TARGETS['eager_forward_backward']})",
        f"compiled fwd+bwd vs eager block (<= {TARGETS['compiled_vs_eager']})",
        f"compiled fwd+bwd vs compiled CBAM (<= {TARGETS['compiled_vs_timm_compiled']})",
        f"no-compiler fwd+bwd vs CBAM (<= {TARGETS['no_compiler_forward_backward']})",
        f"saved / input (<= {TARGETS['saved_ratio']})",
    ]
    parts = ["### Targets (this run)", "", _markdown_table(header, rows)]
    if "network" in results:
        parts += ["", _network_sentence(results["network"])]
    return "\n".join(parts)


def _network_title(network: dict[str, Any]) -> str:
    mixed = network.get("autocast")  # absent in results written before it was recorded
    return f"{network['model']}, one training step on {tuple(network['input'])}" + (
        f" under {mixed} autocast" if mixed else ""
    )


def _network_sentence(network: dict[str, Any]) -> str:
    variants = network["variants"]
    ours = variants.get("ours_operator", variants.get("ours_fast"))
    se = variants["se"]["overhead"]
    text = f"resnet50 overhead over the plain network: ours {100 * ours['overhead']:+.1f}%, SE {100 * se:+.1f}%."
    kinds = (
        ("ours_vs_se", "eager"),
        ("ours_vs_se_channels_last", "eager, channels_last"),
        ("ours_vs_se_compiled", "compiled"),
    )
    for key, what in kinds:
        paired = network.get(key)
        if paired:
            text += (
                f" Round by round, ours against SE ({what}): {100 * paired['median_ratio']:+.1f}% (median), ours"
                f" faster in {paired['faster_rounds']} of {paired['rounds']} rounds."
            )
    return text


def _markdown_section(results: dict[str, Any]) -> str:
    machine, settings = results["machine"], results["settings"]
    versions = f"torch {machine['torch']}, timm {machine.get('timm', '?')}, Python {machine['python']}"
    if settings["device"] == "cuda":
        versions += f", CUDA {machine.get('cuda')}"
    command = settings.get("command", "cbam-dsa bench")
    parts = [
        f"## {_title(results)}",
        "",
        f"Measured {machine['date']} with `{command}`: {settings['rounds']} interleaved rounds"
        f"{' in ' + results['orders'] + ' orders' if results.get('orders') else ''}, "
        f"{machine['cpu_count']} CPUs, {versions}, {machine['platform']}.",
    ]
    legacy = any("ours_fast" in entry["contenders"] for entry in results["shapes"])
    targets = render_targets(results)
    if legacy:
        parts[-1] += " This run predates the operator: *ours, fast path* is the block's former fast path"
        parts[-1] += (
            ", and the targets on the compiled block and the no-compiler path were not measured (-)."
            if targets
            else "."
        )
    elif settings["device"] == "cpu" and "fused_kernels" in machine:
        parts[-1] += (
            " The operator ran on the fused C kernels."
            if machine["fused_kernels"]
            else " The C kernels did not build: the operator ran its PyTorch implementation."
        )
    elif settings["device"] == "cuda" and machine.get("cuda_kernels"):  # absent in results from before it was recorded
        parts[-1] += f" The operator ran on the Triton kernels (triton {machine.get('triton')})."
    heap = machine.get("heap")  # absent in results written before it was recorded
    if heap and heap != "system default":
        parts[-1] += f" The C allocator kept freed memory for reuse (`{heap}`)."
    if targets:
        parts += ["", targets]
    overhead = render_overhead(results.get("overhead"))
    if overhead:
        parts += ["", overhead]
    if settings["device"] == "cuda":
        parts += [
            "",
            "At these sizes one call of timm's modules takes under a millisecond, most of it in kernel launches and"
            " Python dispatch rather than memory traffic.",
        ]
    for entry in results["shapes"]:
        parts += ["", f"### Input {tuple(entry['shape'])} ({_mib(entry['input_bytes'])} MiB)", ""]
        parts.append(_markdown_table(SHAPE_HEADER, _rows(entry)))
        parts += [f"\n`{name}`: skipped ({error})" for name, error in entry["errors"].items()]
    if results["shapes"]:
        parts += ["", f"Peak memory: {results['shapes'][0]['peak_memory_method']}."]
    if results.get("inputs"):
        parts += ["", "### Other inputs, forward + backward", "", INPUTS_NOTE, ""]
        parts.append(_markdown_table(INPUTS_HEADER, _inputs_rows(results["inputs"])))
    if "network" in results:
        network = results["network"]
        parts += ["", f"### {_network_title(network)}", ""]
        parts.append(_markdown_table(NETWORK_HEADER, _network_rows(network)))
        parts += [f"\n`{name}`: skipped ({error})" for name, error in network.get("errors", {}).items()]
        if any(name.endswith("_channels_last") for name in network["variants"]):
            parts += ["", "Channels_last variants' overhead is against the plain network in channels_last."]
        if any(name.endswith("_compiled") for name in network["variants"]):
            parts += ["", "Compiled variants' overhead is against the compiled plain network."]
    return "\n".join(parts)


def render_markdown(runs: Sequence[dict[str, Any]]) -> str:
    """``docs/BENCHMARKS.md``: one section per run (for example a CPU run and GPU runs)."""
    intro = (
        "# Benchmarks\n\n"
        "The block's default configuration against timm's `CbamModule` and `SEModule`, written by `cbam-dsa bench`"
        " (method: [benchmarks/README.md](../benchmarks/README.md); raw results: `benchmarks/results-*.json`).\n"
        "Times are min / median over interleaved rounds; *vs CBAM* is the median over rounds of the time divided"
        " by timm `CbamModule`'s in the same round. *Saved* counts the tensors autograd keeps for backward beyond"
        " the input and the parameters (not measured under torch.compile).\n\n"
        "The block's rows: *operator* is the block as users get it in eager mode, one call of"
        " `torch.ops.cbam_dsa.block_forward` on the C kernels; *without C compiler* is the same operator with"
        " `CBAM_DSA_NATIVE=0`, which runs its PyTorch implementation, as where no C compiler is found;"
        " *reference path* is `block.fast_path = False`, the plain math of `functional.py` under autograd;"
        " *+ compile* is `torch.compile(block, fullgraph=True)`, in which the operator runs inside the graph.\n"
    )
    return intro + "\n" + "\n\n".join(_markdown_section(run) for run in runs) + "\n"


def write_chart(results: dict[str, Any], path: Path) -> None:
    """A bar chart of the time ratios to timm's ``CbamModule`` (forward, forward + backward) per shape, with the
    eager operator's targets as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = results["shapes"]
    names = list(shapes[0]["contenders"]) if shapes else []
    labels = {name: result["label"] for entry in shapes for name, result in entry["contenders"].items()}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    width = 0.8 / max(len(names), 1)
    panels = (
        ("forward", "forward (no_grad)", TARGETS["eager_forward"]),
        ("forward_backward", "forward + backward", TARGETS["eager_forward_backward"]),
    )
    for ax, (key, title, target) in zip(axes, panels, strict=True):
        for i, name in enumerate(names):
            values = [entry["contenders"].get(name, {}).get(key, {}).get("ratio") or 0.0 for entry in shapes]
            positions = [s + (i - (len(names) - 1) / 2) * width for s in range(len(shapes))]
            ax.bar(positions, values, width=width, label=labels[name])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(target, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(shapes)), ["x".join(str(v) for v in entry["shape"]) for entry in shapes])
        ax.set_title(f"{title}; dashed: eager target {target}")
        ax.set_ylabel("time / timm CbamModule (median of rounds)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"cbam-dsa bench: {_title(results)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write ``results-<device>-<dtype>.json``, ``.txt`` (the table) and ``.png`` (the chart) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"results-{results['settings']['device']}-{results['settings']['dtype']}"
    paths = {"json": out / f"{stem}.json", "table": out / f"{stem}.txt", "chart": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["table"].write_text(render_table(results))
    write_chart(results, paths["chart"])
    return paths
