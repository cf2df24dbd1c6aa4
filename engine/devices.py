"""Where a run's tensors live: the ``device`` setting (``cpu``, ``cuda``, ``cuda:N``, ``auto``).

:func:`resolve_device` turns the setting into a :class:`torch.device`:

==========  ==================================================================================
setting     device
==========  ==================================================================================
``cpu``     the CPU (the default; results bit-identical to runs made before the setting)
``cuda``    the current CUDA device; under ``torchrun`` (several ranks) ``cuda:LOCAL_RANK``
``cuda:N``  GPU ``N`` (single process only: ranks of one node would share it)
``auto``    ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``
==========  ==================================================================================

Asking for CUDA where there is none is an error that says what to do: nothing falls back to the
CPU silently.  :func:`numerics` records what decides float32 arithmetic on the device (matmul
precision, TF32 flags) for the run manifest; :func:`to_host` is how results leave the device
(every array written to disk is copied to the CPU explicitly).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.device_spec import cuda_index, device_problem

if TYPE_CHECKING:
    from engine.distributed.group import DistContext


class DeviceError(ValueError):
    """The requested device does not exist here, or does not fit the launch."""


def _no_cuda(spec: str) -> DeviceError:
    built = torch.version.cuda
    why = (f"this PyTorch {torch.__version__} is built without CUDA" if built is None else
           f"this PyTorch (CUDA {built}) sees no GPU: check the driver and CUDA_VISIBLE_DEVICES")
    return DeviceError(f"device = {spec!r} asks for a GPU, but torch.cuda.is_available() is "
                       f"False ({why}); set device = \"cpu\" (or \"auto\": the GPU when there "
                       "is one), or install a CUDA build of PyTorch")


def resolve_device(spec: str | torch.device | None = "cpu",
                   world: DistContext | None = None) -> torch.device:
    """The :class:`torch.device` a run uses for the setting ``spec`` (see the module docstring).

    ``world``: the run's process group; with several ranks, ``cuda`` is each rank's
    ``cuda:LOCAL_RANK``.  Raises :class:`DeviceError` for a malformed setting, for CUDA where
    ``torch.cuda.is_available()`` is false, for a GPU index that does not exist, and for an
    explicit ``cuda:N`` shared by several ranks.
    """
    if spec is None:
        spec = "cpu"
    if isinstance(spec, torch.device):
        spec = str(spec)
    problem = device_problem(spec)
    if problem:
        raise DeviceError(f"device = {spec!r} {problem}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise _no_cuda(spec)
    distributed = world is not None and world.distributed
    index = cuda_index(spec)
    if index is None:   # "cuda" or "auto"
        index = world.local_rank if distributed else torch.cuda.current_device()
    elif distributed:
        raise DeviceError(f"device = {spec!r} would put every rank of this torchrun launch on "
                          "the same GPU; use device = \"cuda\" (each rank takes "
                          "cuda:LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device = {spec!r}: there is no GPU {index} here ({count} visible, "
                          f"cuda:0 to cuda:{count - 1}); pick one of them or set "
                          "CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def numerics(device: torch.device) -> dict[str, Any]:
    """What decides float32 arithmetic, as in effect now: a manifest's record of the device.

    ``torch.get_float32_matmul_precision()`` and the TF32 flags decide float32 CUDA matmuls
    and cuDNN convolutions (TF32 keeps 10 mantissa bits, so float32 results then differ from
    the CPU's; float64 is never affected).  Recorded, never changed here: they are the user's
    process settings.
    """
    out: dict[str, Any] = {
        "device": str(device),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(cuda_device_name=props.name, cuda_version=torch.version.cuda,
                   cuda_capability=f"{props.major}.{props.minor}")
    return out


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as a numpy array in host memory (a copy off a GPU; on the CPU the
    tensor's own memory, as ``Tensor.numpy`` gives it)."""
    return tensor.detach().cpu().numpy()
