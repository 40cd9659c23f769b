"""The device a benchmark measures: choosing it, describing it, and reading the clock on it.

Shared by bench/step_throughput.py, bench/vs_authors.py, bench/memory_1024.py and
bench/conv_peak.py (`--device {cpu,cuda}`):

* `require_device` turns `--device` into a `torch.device`, and refuses `cuda` on a machine
  without one before the script does any work (one line on stderr, exit status 2);
* `require_rank_device` checks that the device the DeepSpeed engines will use (the rank's
  device that `engine.init_distributed` returns, i.e. DeepSpeed's accelerator) is the one asked for;
* `timed` times a call with the device synchronised at both ends: CUDA kernels run
  asynchronously, so without `torch.cuda.synchronize()` the clock would stop when the last
  kernel was queued, not when it finished;
* `describe` / `device_record` name the device for the printed header and the JSON;
* `set_cudnn_benchmark` / `backend_flags` set and record the only backend switch the scripts
  change (`--cudnn-benchmark`), beside torch's TF32 defaults, which they leave as they are.

No torch.distributed here (introvae_dist/collectives.py owns it).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from introvae_dist.precision import cpu_model_and_flags

DEVICE_CHOICES = ("cpu", "cuda")
CPU = torch.device("cpu")
#: Exit status of a refused command line (as argparse's parser.error).
EXIT_USAGE = 2


def add_device_arguments(parser: argparse.ArgumentParser, convolutions: bool = True) -> None:
    """`--device` and, where the script runs convolutions, `--cudnn-benchmark`."""
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="cpu",
                        help="where inputs, networks and timing run (default cpu); cuda needs a CUDA GPU")
    if convolutions:
        parser.add_argument("--cudnn-benchmark", action="store_true",
                            help="set torch.backends.cudnn.benchmark = True (cuDNN tries its algorithms per "
                                 "shape first); off by default, as in torch")


def require_device(name: str, script: str) -> torch.device:
    """`--device name` as a torch.device; for `cuda` without a CUDA GPU, one line on stderr and
    exit 2. Call it right after parsing, before any expensive work, so a wrong machine costs
    nothing. `script` is the path printed, e.g. "bench/step_throughput.py"."""
    if name not in DEVICE_CHOICES:
        raise ValueError(f"device {name!r}: expected one of {DEVICE_CHOICES}")
    if name == "cuda" and not torch.cuda.is_available():
        print(f"{script}: --device cuda: no CUDA GPU on this machine (torch.cuda.is_available() is False; "
              f"torch {torch.__version__})", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
    return torch.device(name)


def require_rank_device(requested: torch.device, rank_device: torch.device, script: str) -> torch.device:
    """The rank's device (what `engine.init_distributed` returned), if it is of the requested
    type; else one line on stderr and exit 2.

    DeepSpeed places the engines' modules on its accelerator, which is the GPU wherever CUDA is
    available, whatever `--device` says; so `--device cpu` on a GPU machine cannot measure the
    CPU through DeepSpeed unless the GPUs are hidden.
    """
    if rank_device.type != requested.type:
        print(f"{script}: --device {requested.type}: DeepSpeed's engines would run on {rank_device} here; "
              f"to measure the CPU on a GPU machine hide the GPUs (CUDA_VISIBLE_DEVICES= python {script} ...)",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
    return rank_device


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's parameters (a DeepSpeed engine's: `engine.module`)."""
    return next(module.parameters()).device


def set_cudnn_benchmark(enabled: bool) -> None:
    """`torch.backends.cudnn.benchmark = enabled`; torch's default is False, so without
    `--cudnn-benchmark` nothing changes."""
    torch.backends.cudnn.benchmark = enabled


def backend_flags() -> dict[str, object]:
    """The backend switches that change what a GPU step computes or how fast, as they are now.

    torch's defaults, which the scripts leave alone: cuDNN may use TF32 for fp32 convolutions
    (`cudnn.allow_tf32` True), fp32 matmuls do not (`matmul.allow_tf32` False).
    """
    return {
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def format_flags(flags: dict[str, object]) -> str:
    return ", ".join(f"{key} {value}" for key, value in flags.items())


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work; a no-op on the CPU, whose ops return when done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], object], device: torch.device = CPU) -> tuple[float, float]:
    """Wall seconds of `call()`, synchronised at both ends on CUDA, and the share of the cores
    this process got meanwhile.

    The share is process CPU time / (wall time x threads): well below 1 on the CPU means other
    processes took cores during the call, so its time says more about the machine than about
    the step. On a GPU the host mostly waits for kernels, so the share says nothing about the
    step there (it is still returned, for the log).
    """
    synchronize(device)  # work queued before the call must not be billed to it
    start, cpu_start = time.perf_counter(), time.process_time()
    call()
    synchronize(device)
    wall_s = time.perf_counter() - start
    return wall_s, (time.process_time() - cpu_start) / (wall_s * torch.get_num_threads())


def cpu_share_filters(device: torch.device) -> bool:
    """Whether rounds are filtered by their share of the cores: on the CPU only (see `timed`)."""
    return device.type == "cpu"


def cpu_model() -> str:
    """The CPU's model name (introvae_dist.precision reads it, with the flags that decide
    bf16), else platform's guess."""
    model, _ = cpu_model_and_flags()
    return model if model != "unknown" else platform.processor() or "unknown"


def device_record(device: torch.device) -> dict[str, object]:
    """The device for a JSON record: the GPU's name, compute capability, memory and the CUDA
    and cuDNN versions; or the CPU's model and core count."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "index": device.index if device.index is not None else torch.cuda.current_device(),
                "name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}",
                "total_memory_bytes": torch.cuda.get_device_properties(device).total_memory,
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                "host_cpu": cpu_model(), "host_cores": os.cpu_count()}
    return {"type": "cpu", "name": cpu_model(), "cores": os.cpu_count()}


def describe(device: torch.device) -> str:
    """One header phrase for the device: "NVIDIA H200 (cuda:0, compute capability 9.0, ...)"
    or the CPU's model and core count."""
    r = device_record(device)
    if r["type"] == "cuda":
        memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        return (f"{r['name']} (cuda:{r['index']}, compute capability {r['compute_capability']}, "
                f"{memory_gib:.1f} GiB; CUDA {r['cuda']}, cuDNN {r['cudnn']}); "
                f"host {r['host_cpu']}, {r['host_cores']} cores")
    return f"{r['name']}, {r['cores']} cores"
