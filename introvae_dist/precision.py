"""`precision: auto`: bf16 where the device computes it natively, fp32 where it does not.

bf16 only pays where the hardware has bf16 arithmetic. Measured on CPUs (docs/BENCHMARKS.md):
a 3x3 convolution in bf16 runs about 2x fp32 on an AMD Zen 4 with AVX-512 BF16, but 14.6x
slower than fp32 on a Zen 2 and 57x slower on a Zen 3, both AVX2 only, where oneDNN emulates
it. GPUs have bf16 tensor cores from Ampere (compute capability 8.0) on; a V100 or T4 has none.

Only torch is imported; the trainer resolves each engine section's precision once, before any
engine starts (`run_plan.plan_run`), and records the choice and its reason in the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

#: /proc/cpuinfo flags of native bf16 arithmetic on x86 (AVX-512 BF16; AMX tiles).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: First CUDA compute capability with bf16 tensor cores (Ampere).
CUDA_BF16_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class Bf16Support:
    """Whether `device` computes bf16 natively, and the facts that say so."""

    device: str
    native: bool
    reason: str
    #: What a person calls the device: "CPU AMD EPYC 7R32", "NVIDIA H200 (cuda:0)".
    name: str = ""


class PrecisionError(ValueError):
    """A precision this trainer cannot run on the device (fp16, see :func:`choose`)."""


@dataclass(frozen=True)
class PrecisionChoice:
    """One engine section's precision: what the config asked, what runs, and why."""

    requested: str
    chosen: str
    reason: str
    #: Set when the choice will be slow (an explicit bf16 without native bf16).
    warning: str | None = None


def training_device(local_rank: int) -> torch.device:
    """The device a rank trains on: its GPU when CUDA is there (DeepSpeed's accelerator), else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def bf16_support(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> Bf16Support:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = torch.cuda.get_device_capability(device)
        native = capability >= CUDA_BF16_CAPABILITY
        has = "has" if native else "has no"
        return Bf16Support(str(device), native, f"{name}, compute capability {capability[0]}.{capability[1]}, "
                                                f"{has} bf16 tensor cores (from 8.0 on)", f"{name} ({device})")
    model, flags = cpu_model_and_flags(cpuinfo)
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return Bf16Support("cpu", True, f"CPU {model} has {' and '.join(found)}", f"CPU {model}")
    return Bf16Support("cpu", False, f"CPU {model} has neither {' nor '.join(CPU_BF16_FLAGS)} "
                                     "(bf16 is emulated, many times slower than fp32)", f"CPU {model}")


def fp16_support(device: torch.device) -> bool:
    """Whether DeepSpeed's accelerator for ``device`` runs fp16, by DeepSpeed 0.19.8's own tests
    (accelerator/cuda_accelerator.py: compute capability >= 7.0; cpu_accelerator.py: oneDNN's
    fp16 support, AVX-512 FP16 or AMX FP16), without importing DeepSpeed."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (7, 0)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose(requested: str, support: Bf16Support, fp16: bool = False) -> PrecisionChoice:
    """Resolve one engine section's `precision` ("auto", "bf16" or "fp32") on a device.

    "fp16" raises :class:`PrecisionError`. Where DeepSpeed cannot run it (``fp16`` False: these
    CPUs) that is the reason. Where it can (pre-Ampere GPUs), Algorithm 1 still cannot: E's
    data-only gradient through G (`algorithm.decode`, Eq. 10's L_AE and L_REG through x_r)
    bypasses the engine's dynamic loss scaling, and an overflow step would have to be skipped by
    both engines alike. Until that is built and verified on a GPU, fp32 is the choice there.
    """
    if requested == "fp16":
        bf16 = "bf16 (native)" if support.native else "bf16 (emulated, slow)"
        if not fp16:
            raise PrecisionError(f"the {support.name} cannot run fp16 (DeepSpeed's accelerator for it does not "
                                 f"support fp16); it supports {bf16} and fp32. Use auto (picks "
                                 f"{'bf16' if support.native else 'fp32'} here), bf16 or fp32")
        raise PrecisionError(f"introvae-dist does not train in fp16 on the {support.name}: "
                             "E's gradient through G would bypass DeepSpeed's loss scaling (docs/DEEPSPEED.md). "
                             f"It supports {bf16} and fp32 here. Use auto (picks "
                             f"{'bf16' if support.native else 'fp32'} here), bf16 or fp32")
    if requested == "auto":
        chosen = "bf16" if support.native else "fp32"
        return PrecisionChoice(requested, chosen, f"auto: {chosen}, since {support.reason}")
    if requested == "bf16" and not support.native:
        return PrecisionChoice(requested, "bf16", f"bf16 as configured; {support.reason}",
                               warning=f"bf16 was asked for, but {support.reason}: every step runs much slower "
                                       "than in fp32 (precision: auto picks fp32 here)")
    return PrecisionChoice(requested, requested, f"{requested} as configured")


def choose_channels_last(requested: bool | str, device: torch.device, precisions: list[str]) -> tuple[bool, str]:
    """`train.channels_last: auto`: NHWC activations where the convolutions run in bf16 or on
    CUDA, NCHW for fp32 on a CPU; an explicit true or false is kept. Returns (chosen, reason).

    Why: cuDNN's tensor-core kernels and oneDNN's bf16 kernels want NHWC (1.19x a step in
    bf16 on a Zen 4, docs/BENCHMARKS.md). oneDNN's fp32 kernels do not: with its AVX2 kernels
    (those of a CPU without native bf16, where `auto` picks fp32) the 32 and 64 px steps of
    bench/vs_authors.py ran 0.84x and 0.99x the authors' NCHW step in channels-last, 0.98x and
    1.12x in NCHW, side by side.
    """
    if requested != "auto":
        return bool(requested), f"train.channels_last={str(requested).lower()}: as configured"
    if device.type == "cuda":
        return True, "auto: channels-last, for cuDNN's tensor-core convolutions"
    if "bf16" in precisions:
        return True, "auto: channels-last, for oneDNN's bf16 convolutions on this CPU"
    return False, "auto: NCHW, since fp32 convolutions on a CPU run as fast or faster in it"


def cpu_model_and_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """The CPU's model name and feature flags from /proc/cpuinfo (what lscpu prints); "unknown"
    and no flags where it cannot be read."""
    model, flags = "unknown", set()
    try:
        text = cpuinfo.read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags
