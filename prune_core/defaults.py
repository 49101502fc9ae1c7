"""Every default a user meets, in one place: the CLI shows these, and the workflows, settings objects and
engines fall back on the same names, so a Python caller gets what the command line gets.

Defaults of the two pruning methods' own arithmetic (AutoPrune's curve, the reference prompt's token
counts) stay beside that arithmetic (:mod:`prune_core.autoprune`, :mod:`prune_core.spec`).
"""

from __future__ import annotations

#: The largest image ``run`` and a served model decode (width x height, checked on the image's header);
#: defined beside the prompt rules, which the Triton model copies.
from .prompt import MAX_IMAGE_PIXELS

__all__ = ["MAX_IMAGE_PIXELS"]  # the rest are this module's own constants

#: Greedy tokens of one answer: ``run``, ``ask`` and a served request that sends no ``max_new_tokens``.
ANSWER_NEW_TOKENS = 64
#: Greedy tokens per data row of an evaluation: ``eval``, ``sweep``.
EVAL_NEW_TOKENS = 16

#: Where PyTorch runs a model (``eval``, ``search``, ``sweep``, ``build``) and in which precision.
TORCH_DEVICE = "cpu"
TORCH_DTYPE = "fp32"
#: The ONNX Runtime provider of a build's graphs: CUDA when it really runs, else the CPU.
PROVIDER = "auto"

#: A build's target and the precision written into its graphs.
TARGET = "onnxruntime"
BUILD_DTYPE = "fp32"
#: ONNX opset of the export.
OPSET = 20
#: Upper bounds of a build's two dynamic prompt lengths (TensorRT profiles, the manifest's shape ranges).
MAX_SYS_TOKENS = 1024
MAX_TEXT_TOKENS = 4096
#: The TensorRT profiles' optimum text length.
OPT_TEXT_TOKENS = 64
#: Largest image batch of a build's vision graph.
MAX_IMAGE_BATCH = 16
#: Largest number of sequences one decode step of a build runs together (``build --max-batch``).
MAX_DECODE_BATCH = 16
#: Tokens a build's decode caches may grow by: the longest answer the build is made for.
BUILD_NEW_TOKENS = 1024
#: Greedy tokens the build check generates per check prompt.
CHECK_NEW_TOKENS = 8
#: Calibration rows of ``build --quantize int8`` (the first N of ``--calib``).
QUANT_CALIB_ROWS = 16

#: ``bench``: measured rounds and unmeasured warm-up rounds of each build.
BENCH_RUNS = 20
BENCH_WARMUP = 3
#: ``sweep --latency``: measured and warm-up rounds of the time to first token.
SWEEP_ROUNDS = 5
SWEEP_WARMUP = 1

#: ``search``: the metric, the total loss allowed (a fraction of the baseline for accuracy, metric units for
#: nll and kl), the tolerance levels, and the layers below which ``img_key`` operations are never pruned.
SEARCH_METRIC = "accuracy"
SEARCH_TOLERANCE = 0.3
SEARCH_STEPS = 15
KEY_DANGER_LAYERS = 6

