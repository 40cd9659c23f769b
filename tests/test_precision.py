"""`precision: auto`: bf16 only where the device computes it natively."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from introvae_dist.config import load_config
from introvae_dist.distributed import World
from introvae_dist.precision import bf16_support, choose, choose_channels_last

ZEN4 = "model name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
ZEN2 = "model name\t: AMD EPYC 7R32\nflags\t\t: fpu sse2 avx2 fma\n"
SAPPHIRE = "model name\t: Intel Xeon Platinum 8488C\nflags\t\t: avx512f amx_bf16 amx_tile\n"


def _cpu(tmp_path: Path, text: str) -> Path:
    # A written /proc/cpuinfo of another CPU: this machine has only one kind.
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,native,flag", [(ZEN4, True, "avx512_bf16"), (SAPPHIRE, True, "amx_bf16"),
                                              (ZEN2, False, "neither avx512_bf16 nor amx_bf16")])
def test_cpu_bf16_comes_from_the_flags(tmp_path: Path, text: str, native: bool, flag: str) -> None:
    support = bf16_support(torch.device("cpu"), _cpu(tmp_path, text))
    assert support.native is native and flag in support.reason
    assert support.reason.startswith("CPU AMD EPYC" if "AMD" in text else "CPU Intel Xeon")


def test_auto_picks_bf16_where_native_and_fp32_elsewhere(tmp_path: Path) -> None:
    assert choose("auto", bf16_support(torch.device("cpu"), _cpu(tmp_path, ZEN4))).chosen == "bf16"
    slow = choose("auto", bf16_support(torch.device("cpu"), _cpu(tmp_path, ZEN2)))
    assert slow.chosen == "fp32" and slow.warning is None
    assert slow.reason.startswith("auto: fp32, since CPU AMD EPYC 7R32 has neither")


def test_explicit_bf16_without_native_bf16_runs_with_one_warning(tmp_path: Path) -> None:
    choice = choose("bf16", bf16_support(torch.device("cpu"), _cpu(tmp_path, ZEN2)))
    assert choice.chosen == "bf16" and "much slower than in fp32" in (choice.warning or "")
    assert choose("fp32", bf16_support(torch.device("cpu"), _cpu(tmp_path, ZEN4))).warning is None


def test_plan_run_resolves_auto_in_the_config_before_the_resume_check(tiny_shards: Path, tmp_path: Path) -> None:
    from introvae_dist.run_plan import plan_run

    cfg = load_config(None, [f"data.shards={tiny_shards}", f"run.root={tmp_path}", "model.resolution_px=16",
                             "model.widths=[8,16]", "train.batch_global=4", "generator.precision=fp32"])
    assert cfg.encoder.precision == "auto"
    plan = plan_run(cfg, World(rank=0, local_rank=0, world_size=1))
    expected = "bf16" if bf16_support(torch.device("cpu")).native else "fp32"  # this machine's CPU
    assert cfg.encoder.precision == expected == plan.precision["encoder"].chosen
    assert plan.precision["generator"].reason == "fp32 as configured"
    # train.channels_last: auto follows the resolved precisions: NHWC where E runs bf16.
    assert cfg.train.channels_last is (expected == "bf16")
    assert plan.channels_last_reason.startswith("auto: ")


@pytest.mark.parametrize(("requested", "device", "precisions", "chosen"), [
    ("auto", "cpu", ["fp32", "fp32"], False),   # oneDNN's fp32 kernels: NCHW (docs/BENCHMARKS.md)
    ("auto", "cpu", ["bf16", "fp32"], True),    # any bf16 engine: NHWC for oneDNN's bf16 kernels
    ("auto", "cuda", ["fp32", "fp32"], True),   # cuDNN: NHWC whatever the precision
    (True, "cpu", ["fp32", "fp32"], True),      # an explicit choice is kept
    (False, "cuda", ["bf16", "bf16"], False),
])
def test_channels_last_auto_is_nhwc_for_bf16_or_cuda_and_nchw_for_fp32_on_a_cpu(
        requested: bool | str, device: str, precisions: list[str], chosen: bool) -> None:
    got, reason = choose_channels_last(requested, torch.device(device), precisions)
    assert got is chosen
    assert reason.startswith("auto: " if requested == "auto" else "train.channels_last=")


def test_channels_last_takes_true_false_or_auto() -> None:
    """(A bad value is refused naming the key: tests/test_config.py.)"""
    assert load_config(None, ["train.channels_last=false"]).train.channels_last is False
    assert load_config(None, []).train.channels_last == "auto"


def test_every_preset_leaves_precision_to_the_device() -> None:
    for path in sorted(Path("configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.encoder.precision == cfg.generator.precision == "auto", path


def test_fp16_on_a_cpu_is_refused_naming_the_device_and_what_it_supports(tmp_path: Path) -> None:
    from introvae_dist.precision import PrecisionError

    with pytest.raises(PrecisionError, match=r"the CPU AMD EPYC 7R32 cannot run fp16 .*supports bf16 \(emulated, "
                                             r"slow\) and fp32\. Use auto \(picks fp32 here\)"):
        choose("fp16", bf16_support(torch.device("cpu"), _cpu(tmp_path, ZEN2)), fp16=False)
    # Where DeepSpeed could run fp16 (a V100), Algorithm 1's hand-made gradient through G could not.
    with pytest.raises(PrecisionError, match="does not train in fp16 on the CPU AMD EPYC 9R14.*bf16 \\(native\\)"):
        choose("fp16", bf16_support(torch.device("cpu"), _cpu(tmp_path, ZEN4)), fp16=True)
