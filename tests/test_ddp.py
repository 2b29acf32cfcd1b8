"""DistributedDataParallel(find_unused_parameters=False): two gloo processes train every configuration, and a
small CNN holding the block under ``torch.compile(DDP(model))``.

The tests start two worker processes (this file run as a script) with a hard time limit. Each worker trains for a
few steps on its own data, then checks that both replicas hold identical parameters and that they equal a
single-process model trained on both workers' data together. Compiled, DDP's buckets split the graph (Dynamo's
DDPOptimizer), and the C kernels' call counters show the operator running in every step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = {
    "softmax-fusion-sigmoid": {},
    "sum-fusion-hardsigmoid": {"ca_fusion": "sum", "ca_gate": "hardsigmoid", "sa_gate": "hardsigmoid"},
    "learnable-temperature-alpha": {"learnable_temperature": True, "learnable_alpha": True, "alpha_init": 0.5},
    "no-residual": {"residual": False},
    "single-branch": {"sa_kernels": (7,), "sa_use_dilated": False},
    "dilated-only-silu": {"sa_kernels": (), "ca_act": "silu"},
    "return-maps": {"return_maps": True},
}
WORLD_SIZE = 2
STEPS = 3
TIME_LIMIT_S = 150


def _data(rank: int, step: int):
    import torch

    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2, 8, 9, 7, generator=generator), torch.randn(2, 8, 9, 7, generator=generator)


def _images(rank: int, step: int):
    """A worker's batch of images and class labels for the compiled network."""
    import torch

    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(1000 * step + rank))
    return x, torch.tensor([rank, step % 4])


def _against_replicas(model, reference) -> dict:
    """Whether every worker holds ``model``'s parameters, and how far they are from the one-process ``reference``."""
    import torch
    import torch.distributed as dist

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, flat)
    reference_flat = torch.cat([p.detach().flatten() for p in reference.parameters()])
    return {
        "replicas_identical": all(torch.equal(gathered[0], g) for g in gathered[1:]),
        "max_diff_to_single_process": float((flat - reference_flat).abs().max()),
    }


def _loss(output, target):
    out = output[0] if isinstance(output, tuple) else output  # the maps never reach the loss
    return (out - target).square().mean()


def _train_config(name: str, rank: int) -> dict:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from cbam_dsa import CBAMResidualDynamicSA

    torch.manual_seed(0)
    block = CBAMResidualDynamicSA(8, **CONFIGS[name])
    reference = CBAMResidualDynamicSA(8, **CONFIGS[name])
    reference.load_state_dict(block.state_dict())
    initial = torch.cat([p.detach().flatten() for p in block.parameters()]).clone()
    model = DistributedDataParallel(block, find_unused_parameters=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    missing_grads: list[str] = []
    for step in range(STEPS):
        x, target = _data(rank, step)
        optimizer.zero_grad()
        _loss(model(x), target).backward()
        missing_grads += [n for n, p in block.named_parameters() if p.grad is None]
        optimizer.step()
        # One model on both workers' data: the mean of the per-worker losses has DDP's averaged gradient.
        reference_optimizer.zero_grad()
        batches = [_data(r, step) for r in range(WORLD_SIZE)]
        sum(_loss(reference(bx), bt) for bx, bt in batches).div(WORLD_SIZE).backward()
        reference_optimizer.step()
    model(_data(rank, STEPS)[0])  # a further forward fails if the last backward left a reduction unfinished

    flat = torch.cat([p.detach().flatten() for p in block.parameters()])
    return {
        **_against_replicas(block, reference),
        "changed": not torch.equal(flat, initial),
        "missing_grads": missing_grads,
    }


def _cnn():
    """Three convolutions, each followed by a block; 256 channels (2.4 MB a convolution), so that 1 MB buckets cut
    the graph. A module of its own, as a user's network is (Dynamo traces it whole; it would skip ``nn.Sequential``'s
    forward and compile each block alone)."""
    import torch
    from torch import nn

    from cbam_dsa import CBAMResidualDynamicSA

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(c, 256, 3, padding=1) for c in (3, 256, 256))
            self.blocks = nn.ModuleList(CBAMResidualDynamicSA(256) for _ in range(3))
            self.head = nn.Linear(256, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for conv, block in zip(self.convs, self.blocks, strict=True):
                x = block(conv(x).relu())
            return self.head(x.mean(dim=(2, 3)))

    return Net()


def _train_compiled(rank: int) -> dict:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from cbam_dsa.ops.cpu import native

    torch.manual_seed(0)
    model, reference = _cnn(), _cnn()
    reference.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(model, bucket_cap_mb=1)
    compiled = torch.compile(ddp)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    library = native.library()
    calls = [0, 0]

    def count() -> list[int]:
        return [library.calls("block_forward"), library.calls("block_backward")] if library else [0, 0]

    def loss(module, x, target):
        return torch.nn.functional.cross_entropy(module(x), target)

    for step in range(STEPS):
        x, target = _images(rank, step)
        optimizer.zero_grad()
        before = count()
        loss(compiled, x, target).backward()
        calls = [total + after - start for total, after, start in zip(calls, count(), before, strict=True)]
        optimizer.step()
        reference_optimizer.zero_grad()
        batches = [_images(r, step) for r in range(WORLD_SIZE)]
        sum(loss(reference, bx, bt) for bx, bt in batches).div(WORLD_SIZE).backward()
        reference_optimizer.step()
    graphs = torch._dynamo.utils.counters["aot_autograd"]["total"]  # one per piece of the split graph
    return {
        **_against_replicas(model, reference),
        "operator_calls": calls if library else None,
        "graphs": graphs,
    }


def _worker(rank: int, init_file: str, result_file: str, mode: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        if mode == "compiled":
            results = {"compiled": _train_compiled(rank)}
        else:
            results = {name: _train_config(name, rank) for name in CONFIGS}
        Path(result_file).write_text(json.dumps(results))
        # Both ranks reach the teardown together (as demo/distributed.py does): a rank that destroys its group while
        # the other still has gloo traffic in flight was seen to abort ("terminate called without an active
        # exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_workers(tmp_path: Path, mode: str) -> list[dict]:
    """Both workers in ``mode`` (``"eager"`` or ``"compiled"``); their results, once both exited cleanly."""
    pytest.importorskip("torch.distributed")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    init_file = tmp_path / "rendezvous"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(init_file), str(tmp_path / f"result{rank}.json"), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in range(WORLD_SIZE)
    ]
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=TIME_LIMIT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the DDP workers did not finish within {TIME_LIMIT_S} s")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for rank, (worker, log) in enumerate(zip(workers, logs, strict=True)):
        assert worker.returncode == 0, f"worker {rank} failed:\n{log[-4000:]}"
    return [json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


@pytest.mark.slow
def test_ddp_two_gloo_processes_train_every_configuration(tmp_path):
    results = _run_workers(tmp_path, "eager")
    for name in CONFIGS:
        for rank, result in enumerate(results):
            r = result[name]
            assert r["replicas_identical"], f"{name}: replicas differ (rank {rank})"
            assert r["changed"], f"{name}: training did not change the parameters"
            assert r["missing_grads"] == [], f"{name}: parameters without a gradient: {r['missing_grads']}"
            assert r["max_diff_to_single_process"] < 1e-5, f"{name}: {r['max_diff_to_single_process']}"


@pytest.mark.slow
def test_compiled_ddp_trains_a_cnn_with_the_operator_in_every_step(tmp_path):
    for rank, found in enumerate(_run_workers(tmp_path, "compiled")):
        r = found["compiled"]
        assert r["replicas_identical"], f"replicas differ (rank {rank})"
        assert r["max_diff_to_single_process"] < 1e-5, r["max_diff_to_single_process"]
        assert r["graphs"] >= 2, "DDP's buckets should have cut the compiled graph"
        if r["operator_calls"] is not None:  # the C kernels built: three blocks, forward and backward, every step
            assert r["operator_calls"] == [3 * STEPS, 3 * STEPS]


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
