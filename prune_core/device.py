"""``--device`` and ``--dtype``: where and in which precision PyTorch runs a model (eval, search, build).

``--device`` is ``cpu``, ``cuda`` or ``cuda:N``; asking for CUDA where torch has none is one line that says
why (a CPU build of torch, or no GPU visible) and what to pass instead. ``--dtype`` is ``fp32``, ``fp16`` or
``bf16``: the weights and activations of the PyTorch model; metrics (NLL, KL) are computed in fp32 on the
same device. torch is imported on first use, so ``--help`` stays instant.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import PruneExportError

DTYPE_NAMES = ("fp32", "fp16", "bf16")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class DeviceError(PruneExportError):
    """A device that does not exist here, or a dtype name that is not one of fp32, fp16, bf16."""


def resolve_device(text: str) -> str:
    """``text`` checked against what this machine has: ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    text = text.strip().lower()
    if not _DEVICE.match(text):
        raise DeviceError(f"--device {text!r} is not a device; use cpu, cuda or cuda:N")
    if text == "cpu":
        return text
    if not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is a CPU build" if torch.version.cuda is None
               else "torch sees no GPU (check the driver and CUDA_VISIBLE_DEVICES)")  # fmt: skip
        raise DeviceError(f"--device {text}: CUDA is not available: {why}; use --device cpu")
    index = int(text.split(":")[1]) if ":" in text else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"--device {text}: this machine has {count} GPU(s) (cuda:0 to cuda:{count - 1})")
    return text


def torch_dtype(name: str) -> Any:
    """The torch dtype of ``fp32``/``fp16``/``bf16``."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise DeviceError(f"--dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return table[name]


def provider_for(device: str | None, provider: str = "auto") -> str:
    """The ONNX Runtime provider for ``--device`` on a build (``provider`` where ``--device`` is not given).

    Builds run on ONNX Runtime, which uses the first visible GPU: ``cuda:N`` with N > 0 is refused with the
    environment variable that selects that GPU.
    """
    if device is None:
        return provider
    text = device.strip().lower()
    if not _DEVICE.match(text):
        raise DeviceError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N")
    if text == "cpu":
        return "cpu"
    index = text.partition(":")[2]
    if index and int(index) > 0:
        raise DeviceError(f"--device {device}: builds run on ONNX Runtime's first visible GPU; select GPU "
                          f"{index} with CUDA_VISIBLE_DEVICES={index} and --device cuda")  # fmt: skip
    return "cuda"
