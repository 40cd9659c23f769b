"""Images/s of one full IntroVAE training step, bf16 against fp32, through real DeepSpeed engines.

What is measured: the wall time of `algorithm.train_step` (Algorithm 1: the encoder phase and
the generator phase, each with its backward and its optimiser step) on the 128 preset's
networks (Table 3 at 128 px, latent 256, BatchNorm, residual blocks checkpointed), at one
rank's batch, with both networks wrapped by `engine.build_engine` as in training. Data loading
is left out: one fixed random batch is reused, so the figure is the ceiling the step itself
sets on training speed.

How: one process, a world of one. Every variant gets its own pair of engines, built from the
same seed. After warm-up steps the variants run in rounds (bf16, fp32, bf16, fp32, ...), so
slow phases of a noisy machine fall on all of them alike; the median step time per variant is
reported, and the ratio to fp32 is the figure to compare across machines. Each step also
records its share of the cores (process CPU time / (wall time x threads)). A share well below
1 means another process took cores during the step; with one thread per core a lost core
stalls every parallel region, so such a step can take several times longer (seen: 3x) and by
different factors per variant. Rounds in which any variant got less than `--min-cpu-share` are
logged but left out of the medians.

With `--device cuda` the engines are on the GPU (DeepSpeed's accelerator; the rank's device
from `engine.init_distributed`), the batch and the noise are made there, and every timed step
starts and ends with `torch.cuda.synchronize()` (bench/device.py), so a step's time is that of
its kernels, not of queueing them. The core-share filter is off there: all rounds are used,
since process CPU time says nothing about GPU work. cuDNN's autotuner is off unless
`--cudnn-benchmark`; the header and the JSON record the device and these switches.

Model FLOPs per image are counted once, with torch's FLOP formulas (`FlopCounter`), over one plain-PyTorch step on
meta-device modules (forward + backward; convolutions and matmuls only, the optimiser is not counted)
without activation checkpointing, so recomputation is not credited as useful work; the count
that includes recomputation is reported beside it. TFLOP/s = model FLOPs / median step time.
MFU = TFLOP/s / the device's bf16 peak measured at the start of the run (bench/conv_peak.py's
`peak_tflops`: the higher of the best 3x3 convolution and a large matmul). It is measured
on `--device cuda` (under a thousand short kernels there) and on the CPU only with `--mfu`:
CPUs without bf16 vector units take minutes over it.

    python bench/step_throughput.py
    python bench/step_throughput.py --no-checkpointing --steps 5 --json /tmp/step.json
    python bench/step_throughput.py --device cuda --batch 64 --json /tmp/step_gpu.json
    python bench/step_throughput.py --device cuda --resolution-px 1024 --batch 16 --channels-last \
        --checkpoint-min-side-px 512
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from conv_peak import PeakTflops, peak_tflops
from device import (
    CPU,
    add_device_arguments,
    backend_flags,
    cpu_model,
    cpu_share_filters,
    describe,
    device_record,
    format_flags,
    module_device,
    require_device,
    require_rank_device,
    set_cudnn_benchmark,
    timed,
)

from introvae_dist import models, plain_engine
from introvae_dist.algorithm import Engine, StepNoise, StepOrder, train_step
from introvae_dist.config import EngineConfig, ModelConfig
from introvae_dist.distributed import world_from_env
from introvae_dist.losses import LossWeights
from introvae_dist.models import Encoder, Generator, param_dtype

Precision = Literal["bf16", "fp32"]
#: The encoder's engine and the generator's engine of one variant.
EnginePair = tuple[Engine, Engine]

#: Measured variants, in the order of every round; the last one is the reference of the ratios.
PRECISIONS: tuple[Precision, ...] = ("bf16", "fp32")
REFERENCE: Precision = "fp32"
LATENT_DIM = 256
#: Sec. 4.1's alpha, beta, m: the adversarial phase (alpha > 0), as after the VAE warm-up.
WEIGHTS = LossWeights(alpha=0.25, beta=0.5, margin=110.0)
#: Batch of the FLOP count; conv and matmul FLOPs are linear in the batch, BatchNorm needs >= 2.
FLOP_COUNT_BATCH = 2
SEED = 0
SCRIPT = "bench/step_throughput.py"


@dataclass(frozen=True)
class Setup:
    """What one run measures; every variant shares it."""

    resolution_px: int
    batch_per_rank: int
    zero_stage: int
    checkpointing: bool
    #: Activations in channels-last (train.channels_last), the layout cuDNN's bf16 tensor-core
    #: kernels and oneDNN prefer; the batch is converted to it as the trainer does.
    channels_last: bool = False
    #: model.checkpoint_min_side_px: recompute only blocks at least this large (0: all).
    checkpoint_min_side_px: int = 0


@dataclass
class Result:
    """One variant's step times and the figures derived from them."""

    variant: str
    step_s: list[float]
    cpu_share: list[float]
    #: Indices into step_s of the rounds the medians are taken over.
    rounds_used: list[int]
    median_step_s: float
    images_per_s: float
    ratio_to_reference: float
    model_tflop_per_s: float
    median_cpu_share: float
    #: model TFLOP/s / the measured bf16 peak; None where the peak was not measured.
    mfu: float | None
    #: The largest torch.cuda.max_memory_allocated() of its timed steps (all engines' weights,
    #: gradients and optimiser state included); None on the CPU.
    peak_memory_gib: float | None = None


def preset_model(resolution_px: int, checkpointing: bool, latent_dim: int = LATENT_DIM,
                 min_side_px: int = 0) -> ModelConfig:
    """The model section of the preset at `resolution_px` (Table 3 widths, BatchNorm).
    `min_side_px` is `model.checkpoint_min_side_px`."""
    return ModelConfig(resolution_px=resolution_px, latent_dim=latent_dim, widths=None, norm="batch",
                       checkpoint_blocks=checkpointing, checkpoint_min_side_px=min_side_px)


def seeded_networks(resolution_px: int, checkpointing: bool, latent_dim: int = LATENT_DIM,
                    min_side_px: int = 0) -> tuple[Encoder, Generator]:
    """E and G of :func:`preset_model`, built as training builds them and seeded with SEED:
    every variant starts alike."""
    torch.manual_seed(SEED)
    return models.build_networks(preset_model(resolution_px, checkpointing, latent_dim, min_side_px))


def step_inputs(resolution_px: int, batch: int, seed: int, latent_dim: int = LATENT_DIM,
                device: torch.device = CPU) -> tuple[torch.Tensor, StepNoise]:
    """A random image batch (B, 3, R, R) in [0, 1] and the step's noise, on `device`.

    Drawn on the CPU from one seeded generator and then moved, so every device gets the same
    values."""
    rng = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, resolution_px, resolution_px, generator=rng).to(device)
    return x, StepNoise.sample(batch, latent_dim, rng, device)


def count_step_flops_per_image(resolution_px: int, checkpointing: bool, latent_dim: int = LATENT_DIM,
                               order: StepOrder = "algorithm1", min_side_px: int = 0) -> float:
    """FLOPs per image of one plain-PyTorch train_step (forward + backward) in `order`.

    Counted on the meta device: shapes only, so even the 1024 px networks cost no memory and
    no time. Gives the same counts as real fp32 tensors (checked against a run on real
    tensors when this was written).
    """
    enc, gen = models.build_networks(preset_model(resolution_px, checkpointing, latent_dim, min_side_px), "meta")
    with torch.device("meta"):
        x = torch.rand(FLOP_COUNT_BATCH, 3, resolution_px, resolution_px)
        noise = StepNoise(torch.randn(FLOP_COUNT_BATCH, latent_dim), torch.randn(FLOP_COUNT_BATCH, latent_dim))
    with FlopCounter() as counter:
        train_step(plain_engine.PlainEngine(enc), plain_engine.PlainEngine(gen), x, noise, WEIGHTS, order=order,
                   adopt=plain_engine.adopt_outputs)
    return counter.total / FLOP_COUNT_BATCH


class FlopCounter(TorchDispatchMode):
    """Sums the FLOPs of every op that torch's FlopCounterMode knows (convolutions, matmuls).

    The same per-op formulas as `FlopCounterMode`, without its module tracking: that tracking
    hooks module inputs and refuses `torch.autograd.grad` on a leaf ("_will_engine_execute_node"),
    which `algorithm.decode` uses.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def build_variant(setup: Setup, precision: Precision, channels_last: bool = False,
                  fused_adam: bool = False, world_size: int = 1, latent_dim: int = LATENT_DIM,
                  min_side_px: int = 0) -> EnginePair:
    """The encoder and generator engines of one variant (DeepSpeed, as training builds them)."""
    from introvae_dist import engine  # imports DeepSpeed

    cfg = EngineConfig(zero_stage=setup.zero_stage, precision=precision, fused_adam=fused_adam)
    enc, gen = seeded_networks(setup.resolution_px, setup.checkpointing, latent_dim, min_side_px)
    if channels_last:  # as the trainer does with train.channels_last (and the caller's input)
        gen.activation_memory_format = torch.channels_last
    return (engine.build_engine(enc, cfg, setup.batch_per_rank, world_size),
            engine.build_engine(gen, cfg, setup.batch_per_rank, world_size))


def engines_device(variants: dict[str, EnginePair]) -> torch.device:
    """The one device all engines' modules are on (DeepSpeed's accelerator): the inputs go there."""
    devices = {module_device(e.module) for pair in variants.values() for e in pair}
    if len(devices) != 1:
        raise RuntimeError(f"the engines' modules are on several devices: {sorted(map(str, devices))}")
    return devices.pop()


def train_step_call(engines: EnginePair, x: torch.Tensor, noise: StepNoise,
                    order: StepOrder = "algorithm1") -> Callable[[], object]:
    """One `train_step` of DeepSpeed engines on fixed inputs, reading a loss so the step has finished."""
    from introvae_dist import engine  # imports DeepSpeed

    enc, gen = engines
    return lambda: train_step(enc, gen, x, noise, WEIGHTS, order=order, adopt=engine.adopt_outputs)["loss_g"].item()


@dataclass
class StepTimes:
    """One variant's timed steps: wall seconds and the share of the cores it got."""

    wall_s: list[float]
    cpu_share: list[float]
    #: torch.cuda.max_memory_allocated() at the end of each timed step, reset before it (CUDA only).
    peak_bytes: list[int] = field(default_factory=list)


def run_rounds(calls: dict[str, Callable[[], object]], warmup_steps: int, steps: int,
               device: torch.device = CPU) -> dict[str, StepTimes]:
    """Warm-up rounds, then `steps` timed rounds; each round runs every variant once, in order,
    so a slow phase of the machine falls on all of them. Each call is timed with `device`
    synchronised at both ends (bench/device.py's `timed`)."""
    times = {name: StepTimes([], []) for name in calls}
    width = max(map(len, calls))
    for round_index in range(warmup_steps + steps):
        warm = round_index < warmup_steps
        for name, call in calls.items():
            if device.type == "cuda":  # each variant's own peak: the others' tensors are freed by now
                torch.cuda.reset_peak_memory_stats(device)
            wall, share = timed(call, device)
            if not warm:
                times[name].wall_s.append(wall)
                times[name].cpu_share.append(share)
                if device.type == "cuda":
                    times[name].peak_bytes.append(torch.cuda.max_memory_allocated(device))
            label = f"warm-up {round_index + 1}" if warm else f"round {round_index - warmup_steps + 1}"
            print(f"  {label:>10} {name:>{width}}: {wall:7.2f} s, cpu share {share:4.2f}", flush=True)
    return times


def clean_rounds(times: dict[str, StepTimes], min_cpu_share: float) -> list[int]:
    """Indices of the timed rounds in which every variant had at least `min_cpu_share`."""
    rounds = len(next(iter(times.values())).wall_s)
    return [i for i in range(rounds) if all(t.cpu_share[i] >= min_cpu_share for t in times.values())]


def median_wall_s(times: dict[str, StepTimes], rounds: list[int]) -> dict[str, float]:
    """Each variant's median wall seconds over the timed rounds `rounds`."""
    return {name: statistics.median(t.wall_s[i] for i in rounds) for name, t in times.items()}


def summarise(times: dict[str, StepTimes], rounds: list[int], batch: int, model_flops_per_image: float,
              peak: PeakTflops | None = None, reference_variant: str = REFERENCE) -> list[Result]:
    """Medians over `rounds` per variant, and the figures derived from them (MFU over
    `peak.best` where the peak was measured; speed ratios to `reference_variant`)."""
    medians = median_wall_s(times, rounds)
    reference = medians[reference_variant]
    results = []
    for name, t in times.items():
        tflops = model_flops_per_image * batch / medians[name] / 1e12
        results.append(Result(
            variant=name, step_s=t.wall_s, cpu_share=t.cpu_share, rounds_used=rounds,
            median_step_s=medians[name], images_per_s=batch / medians[name],
            ratio_to_reference=reference / medians[name], model_tflop_per_s=tflops,
            median_cpu_share=statistics.median(t.cpu_share[i] for i in rounds),
            mfu=None if peak is None else tflops / peak.best,
            peak_memory_gib=max(t.peak_bytes) / 2**30 if t.peak_bytes else None))
    return results


def format_table(results: list[Result]) -> str:
    lines = [f"{'variant':<8} {'median s/step':>13} {'images/s':>9} {'vs ' + REFERENCE:>8} {'TFLOP/s':>8} "
             f"{'MFU':>5} {'cpu share':>9} {'peak GiB':>8}"]
    for r in results:
        mfu = "-" if r.mfu is None else f"{r.mfu:.0%}"
        memory = "-" if r.peak_memory_gib is None else f"{r.peak_memory_gib:.2f}"
        lines.append(f"{r.variant:<8} {r.median_step_s:>13.3f} {r.images_per_s:>9.3f} "
                     f"{r.ratio_to_reference:>7.2f}x {r.model_tflop_per_s:>8.3f} {mfu:>5} {r.median_cpu_share:>9.2f} "
                     f"{memory:>8}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution-px", type=int, default=128, help="image side; networks of Table 3 at this size")
    parser.add_argument("--batch", type=int, default=8, help="images per rank per step (>= 2 for BatchNorm)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3), help="ZeRO stage of both engines")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep activations instead of recomputing")
    parser.add_argument("--checkpoint-min-side-px", type=int, default=0,
                        help="recompute only residual blocks at least this large (model.checkpoint_min_side_px; 0: all)")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels-last activations and batch (train.channels_last), as the presets train")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--min-cpu-share", type=float, default=0.9,
                        help="leave out rounds where a variant had less of the cores (0 keeps all; "
                             "not applied with --device cuda)")
    parser.add_argument("--mfu", action="store_true",
                        help="on cpu also measure the bf16 peak for MFU (minutes without bf16 units; "
                             "always done on cuda)")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    if args.checkpoint_min_side_px < 0:
        parser.error(f"--checkpoint-min-side-px {args.checkpoint_min_side_px}: expected >= 0 (0: every block)")
    if args.batch < 2 or args.steps < 1 or args.warmup_steps < 0 or args.threads < 1 or not 0 <= args.min_cpu_share <= 1:
        parser.error("expected --batch >= 2, --steps >= 1, --warmup-steps >= 0, --threads >= 1, "
                     "0 <= --min-cpu-share <= 1")
    return args


def header(command: str, setup: Setup, args: argparse.Namespace, model_flops: float, executed_flops: float,
           variants: dict[str, EnginePair], load_at_start: float, device: torch.device,
           peak: PeakTflops | None) -> str:
    """The lines printed above the per-step log: command, machine, setup, FLOPs, dtypes."""
    recompute = f"executed with recomputation {executed_flops / 1e9:.1f}" if setup.checkpointing else "no recomputation"
    dtypes = ", ".join(f"{name} {param_dtype(e.module)}/{param_dtype(g.module)}" for name, (e, g) in variants.items())
    machine = describe(device) if device.type == "cuda" else f"{cpu_model()}, {os.cpu_count()} cores"
    return "\n".join([
        f"# {command}",
        f"# {machine}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"1-min load average at start {load_at_start:.2f}",
        f"# device {device}; {format_flags(backend_flags())}; "
        + (peak.describe() if peak is not None else "bf16 peak not measured (no MFU; --mfu to measure it)"),
        f"# {asdict(setup)}; {args.warmup_steps} warm-up + {args.steps} timed steps per variant, interleaved",
        f"# model GFLOP per image per step {model_flops / 1e9:.1f} (forward + backward); {recompute}",
        f"# parameter dtypes (E, G): {dtypes}",
    ])


def rounds_for_medians(times: dict[str, StepTimes], min_cpu_share: float,
                       device: torch.device = CPU) -> tuple[list[int], str]:
    """The clean rounds and a line saying so; all rounds and a warning when none is clean.
    On a GPU all rounds and a line saying why (`device.cpu_share_filters`)."""
    total = len(next(iter(times.values())).wall_s)
    if not cpu_share_filters(device):
        return list(range(total)), (f"# medians over all {total} rounds (no core-share filter on {device.type}: "
                                    f"process CPU time says nothing about GPU work)")
    rounds = clean_rounds(times, min_cpu_share)
    if rounds:
        return rounds, (f"# medians over {len(rounds)} of {total} rounds (left out: rounds where a variant "
                        f"had < {min_cpu_share:.2f} of the cores)")
    return list(range(total)), (f"# WARNING: every round had a variant with < {min_cpu_share:.2f} of the cores; "
                                f"another process was running, so the medians below are the machine's load, "
                                f"not the step's")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = require_device(args.device, SCRIPT)  # before any work: a wrong machine costs nothing
    set_cudnn_benchmark(args.cudnn_benchmark)
    command = " ".join(["python", SCRIPT, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    setup = Setup(args.resolution_px, args.batch, args.zero_stage, not args.no_checkpointing, args.channels_last,
                  args.checkpoint_min_side_px)
    torch.set_num_threads(args.threads)

    # FLOPs first, on plain modules: no DeepSpeed needed for the count.
    model_flops = count_step_flops_per_image(setup.resolution_px, checkpointing=False)
    executed_flops = (count_step_flops_per_image(setup.resolution_px, True, min_side_px=setup.checkpoint_min_side_px)
                      if setup.checkpointing else model_flops)

    from introvae_dist import engine  # imports DeepSpeed

    world_from_env()  # a world of one: sets RANK, WORLD_SIZE, MASTER_* for DeepSpeed
    rank_device = require_rank_device(device, engine.init_distributed(), SCRIPT)
    torch.set_num_threads(args.threads)  # after DeepSpeed's set-up, in case it changed them
    # The peak before the engines exist: nothing else is on the device yet.
    peak = peak_tflops(rank_device) if device.type == "cuda" or args.mfu else None
    variants = {precision: build_variant(setup, precision, channels_last=setup.channels_last,
                                         min_side_px=setup.checkpoint_min_side_px) for precision in PRECISIONS}
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    print(header(command, setup, args, model_flops, executed_flops, variants, load_at_start, rank_device, peak),
          flush=True)

    # The inputs follow the engines: DeepSpeed put the modules on its accelerator's device.
    x, noise = step_inputs(setup.resolution_px, setup.batch_per_rank, SEED + 1, device=engines_device(variants))
    if setup.channels_last:  # as the trainer converts each batch (train.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    calls = {name: train_step_call(engines, x, noise) for name, engines in variants.items()}
    times = run_rounds(calls, args.warmup_steps, args.steps, rank_device)
    rounds, note = rounds_for_medians(times, args.min_cpu_share, rank_device)
    results = summarise(times, rounds, setup.batch_per_rank, model_flops, peak)
    print(note)
    print(format_table(results))

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": command, "device": device_record(rank_device), "backend_flags": backend_flags(),
            "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_average_at_start": load_at_start, "setup": asdict(setup),
            "warmup_steps": args.warmup_steps, "steps": args.steps,
            "min_cpu_share": args.min_cpu_share if cpu_share_filters(rank_device) else None,
            "peak_tflops": None if peak is None else {**asdict(peak), "best": peak.best},
            "model_flops_per_image": model_flops, "executed_flops_per_image": executed_flops,
            "results": [asdict(r) for r in results],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
