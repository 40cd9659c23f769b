"""Collectives: one module calls torch.distributed, the GPU is bound before the first
collective, and no collective is skipped at one rank."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from conftest import REPO, free_port
from introvae_dist import collectives

#: Code that runs in training, evaluation, inference and the benchmarks.
SCANNED = [REPO / "introvae_dist", REPO / "launchers", REPO / "bench"]
OWNER = REPO / "introvae_dist" / "collectives.py"


def _distributed_uses(path: Path) -> list[str]:
    """Lines of ``path`` that import or name torch.distributed."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno}" for a in node.names if a.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            named = any(a.name == "distributed" for a in node.names) and node.module == "torch"
            if node.module.startswith("torch.distributed") or named:
                found.append(f"{path.name}:{node.lineno}")
        elif (isinstance(node, ast.Attribute) and node.attr == "distributed"
              and isinstance(node.value, ast.Name) and node.value.id == "torch"):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_only_the_collectives_module_calls_torch_distributed() -> None:
    files = [p for root in SCANNED for p in sorted(root.rglob("*.py")) if p != OWNER]
    assert len(files) > 30  # the scan sees the package, not an empty folder
    uses = [use for p in files for use in _distributed_uses(p)]
    assert uses == [], f"torch.distributed used outside introvae_dist/collectives.py: {uses}"


def test_the_scan_finds_each_spelling(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import torch.distributed as dist\nfrom torch import distributed\n"
                     "from torch.distributed import barrier\nimport torch\ntorch.distributed.barrier()\n")
    assert len(_distributed_uses(probe)) == 4


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-rank world's variables, restored after the test (world_from_env writes them)."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)


def test_init_distributed_binds_the_gpu_before_its_first_collective(world_of_one: None,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine has no GPU, so CUDA is a test double here: `is_available`, `device_count`
    and `set_device` are replaced by recorders; the process group, DeepSpeed's init and the
    collectives are real (gloo). The order of the calls is what is checked."""
    from introvae_dist import engine

    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(f"set_device({d})"))

    def recording(name: str) -> Any:
        real = getattr(dist, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            events.append(name)
            return real(*args, **kwargs)
        return call

    for name in ("init_process_group", "barrier", "all_reduce", "all_gather_object", "broadcast_object_list",
                 "broadcast"):
        monkeypatch.setattr(dist, name, recording(name))
    try:
        device = engine.init_distributed(30.0)
        assert device == torch.device("cuda", 0)
    finally:
        engine.shutdown_distributed()
    assert events[0] == "set_device(0)", events
    assert "init_process_group" in events and "barrier" in events, events  # the collectives were seen


def test_every_collective_runs_at_one_rank(world_of_one: None) -> None:
    """No world-size-1 shortcut: each call goes through a real gloo group of one."""
    collectives.init_process_group(torch.device("cpu"), 30.0)
    try:
        total = collectives.sum_(torch.tensor([1.0, 2.0], dtype=torch.float64))
        assert total.tolist() == [1.0, 2.0] and total.device.type == "cpu"
        assert collectives.gather_object({"a": 1}) == [{"a": 1}]
        assert collectives.broadcast_object(["x"]) == ["x"]
        t = torch.arange(3.0)
        collectives.broadcast_tensor_(t)
        assert t.tolist() == [0.0, 1.0, 2.0]
        collectives.barrier()
        assert collectives.backend_device() == torch.device("cpu")
    finally:
        collectives.destroy()
    assert not collectives.is_initialized()


def test_sum_does_not_change_its_input(world_of_one: None) -> None:
    collectives.init_process_group(torch.device("cpu"), 30.0)
    try:
        values = torch.tensor([3.0])
        collectives.sum_(values)[0] = 7.0
        assert values.item() == 3.0
    finally:
        collectives.destroy()


def test_an_error_exit_leaves_a_gloo_group_while_the_interpreter_is_whole(world_of_one: None) -> None:
    """launchers/train.py's bad-input and NaN exits call engine.leave_after_failure: a gloo group
    left to the interpreter's teardown aborted a process once (exit -6 for 2). A second call,
    without a group, does nothing."""
    from introvae_dist.engine import leave_after_failure

    collectives.init_process_group(torch.device("cpu"), 30.0)
    try:
        leave_after_failure()
        assert not collectives.is_initialized()
        leave_after_failure()
    finally:
        collectives.destroy()


def test_more_ranks_on_a_node_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA is a test double (no GPU here): a node with 2 GPUs, asked for local rank 2."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but this node has 2 GPU"):
        collectives.bind_device(2)


def test_bind_device_on_a_cpu_machine_is_the_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert collectives.bind_device(0) == torch.device("cpu")
