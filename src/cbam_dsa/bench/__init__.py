"""The benchmark behind ``cbam-dsa bench``: the block against timm's CBAM and SE, eager and compiled.

Measuring is kept apart from rendering:

* :mod:`.contenders`: what is compared (the block's operator, its no-compiler path, its reference path and its
  compiled form; timm's ``CbamModule`` and ``SEModule``, eager and compiled);
* :mod:`.timing`: interleaved rounds and the per-round ratios taken over them;
* :mod:`.memory`: bytes saved for backward, peak memory, page faults;
* :mod:`.measure`: the figures per input shape, the operator's per-call overhead, and a whole run;
* :mod:`.inputs`: the block on other inputs (channels_last, a strided view, float16, bfloat16);
* :mod:`.network`: a training step of timm's resnet50 with each attention layer, eager and compiled;
* :mod:`.render`: text tables, Markdown (``docs/BENCHMARKS.md``), the project's targets, JSON and a chart.

The method is written down in ``benchmarks/README.md``. timm, torchvision and matplotlib are imported only when the
benchmark runs.
"""

from .contenders import BASELINE, LABELS, NO_COMPILER, Contender, build_contenders, environment
from .inputs import INPUT_KINDS, make_input, measure_inputs
from .measure import (
    QUICK_SHAPES,
    SHAPES,
    Settings,
    capture_operator_args,
    measure_overhead,
    measure_shape,
    run_benchmark,
)
from .memory import KEPT_HEAP, counting_faults, keep_freed_memory, peak_step_memory, saved_tensor_bytes
from .network import NETWORK_LABELS, measure_network
from .render import TARGETS, render_markdown, render_overhead, render_table, render_targets, write_chart, write_outputs
from .timing import balanced_orders, interleaved_times, paired_comparison, round_ratio, summarize, timed_faults

__all__ = [
    "BASELINE",
    "INPUT_KINDS",
    "KEPT_HEAP",
    "LABELS",
    "NETWORK_LABELS",
    "NO_COMPILER",
    "QUICK_SHAPES",
    "SHAPES",
    "TARGETS",
    "Contender",
    "Settings",
    "balanced_orders",
    "build_contenders",
    "capture_operator_args",
    "counting_faults",
    "environment",
    "interleaved_times",
    "keep_freed_memory",
    "make_input",
    "measure_inputs",
    "measure_network",
    "measure_overhead",
    "measure_shape",
    "paired_comparison",
    "peak_step_memory",
    "render_markdown",
    "render_overhead",
    "render_table",
    "render_targets",
    "round_ratio",
    "run_benchmark",
    "saved_tensor_bytes",
    "summarize",
    "timed_faults",
    "write_chart",
    "write_outputs",
]
