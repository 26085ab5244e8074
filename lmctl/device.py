"""The machine a process trains or serves on, as the decisions that depend on it see it.

`Device` is a plain record (kind, name, native bfloat16, free and total memory) and
`this_device()` fills it from torch (CUDA: compute capability and `torch.cuda.mem_get_info`)
or, on the CPU, from psutil's available memory. Every decision that depends on the machine
takes a `Device`, so tests give it a GPU's answers on a CPU-only machine.

`model.dtype: auto` is resolved here, once, for training, eval and serving:

- bfloat16 on a CUDA GPU that computes in it natively (compute capability 8.0 or newer:
  A100, A10/L4, RTX 30xx/40xx, H100);
- float16 on an older CUDA GPU (T4, V100), where the Trainer refuses bf16. Falling back
  rather than refusing, because `auto` means "what this machine runs best" and these 16 GB
  cards are exactly where float32 would not fit; the Trainer then trains with fp16 autocast
  and loss scaling over float32 LoRA weights (peft keeps adapters in float32), the usual
  recipe on those cards. An explicit `bfloat16` on such a GPU is refused at pre-flight;
- float32 on the CPU.

torch's own `is_bf16_supported()` is not used: by default it also answers yes where bf16 is
only emulated (pre-Ampere GPUs), which is exactly the case to tell apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# What the CUDA context, cuBLAS workspace and the caching allocator's slack take on the GPU
# beyond the tensors torch.cuda.max_memory_allocated counts: ~0.3-0.6 GB on recent drivers
# (larger with lazy module loading off). A planning number, documented in docs/memory.md.
CUDA_CONTEXT_BYTES = int(0.5 * 2**30)
BF16_CAPABILITY = (8, 0)  # Ampere: the first compute capability with native bfloat16 math


@dataclass(frozen=True)
class Device:
    """One accelerator (or the CPU) as lmctl's decisions need it."""

    kind: Literal["cuda", "cpu"]
    name: str
    bf16: bool  # computes in bfloat16 natively (CPU: torch runs bf16 on any x86/ARM CPU)
    free_bytes: int  # free GPU memory, or the CPU's available memory
    total_bytes: int

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"


def cuda_device(name: str, capability: tuple[int, int], free_bytes: int, total_bytes: int) -> Device:
    """A CUDA GPU from what torch reports about it (tests build one from a real card's numbers)."""
    return Device("cuda", name, tuple(capability) >= BF16_CAPABILITY, int(free_bytes), int(total_bytes))


def cpu_device() -> Device:
    import psutil

    memory = psutil.virtual_memory()
    return Device("cpu", "cpu", True, int(memory.available), int(memory.total))


def this_device(index: int | None = None) -> Device:
    """This process's device: CUDA GPU `index` (default: the current one) where CUDA is available."""
    import torch

    if not torch.cuda.is_available():
        return cpu_device()
    index = torch.cuda.current_device() if index is None else index
    free, total = torch.cuda.mem_get_info(index)
    return cuda_device(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index), free, total)


def resolve_dtype(requested: str, device: Device) -> str:
    """The dtype `model.dtype` means on `device`: `auto` resolved, any other name as given."""
    if requested != "auto":
        return requested
    if not device.cuda:
        return "float32"
    return "bfloat16" if device.bf16 else "float16"


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2
