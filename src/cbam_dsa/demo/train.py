"""The demo's training loop: seeded, with progress bars, on one process or under ``torchrun`` (DDP).

Every variant is trained with the same data, seed, optimiser, schedule and number of steps. Under
``torchrun --nproc_per_node=N`` each process takes ``1/N`` of every global batch (so the global batches and the
schedule are those of a single process), gradients are averaged by DDP (gloo on CPU, NCCL on GPU), and only rank 0
evaluates, keeps the model and writes anything.

Localisation lift (:func:`localisation_lift`): for each attention stage, the share of the spatial map's mass that
falls inside the digit's box, divided by the box's share of the image; 1.0 is chance, ``1 / box share`` is the most.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from .data import ImageSet
from .model import build_model

__all__ = [
    "DistContext",
    "RunResult",
    "TrainConfig",
    "attention_stats",
    "block_alphas",
    "box_coverage",
    "evaluate",
    "localisation_lift",
    "resolve_device",
    "setup_distributed",
    "teardown_distributed",
    "train_model",
    "train_variant",
    "warmup_cosine",
]


@dataclass(frozen=True)
class TrainConfig:
    """The training schedule shared by every variant.

    Args:
        epochs (int): passes over the training set. Default: ``6``.
        batch_size (int): global batch size (split across processes under DDP). Default: ``64``.
        lr (float): peak learning rate of AdamW; linear warm-up over the first 20% of the steps, then cosine
            decay (:func:`warmup_cosine`). Default: ``4e-3``.
        weight_decay (float): AdamW weight decay. Default: ``5e-4``.
        eval_batch_size (int): batch size for evaluation. Default: ``256``.
        curve_images (int): test images evaluated after each epoch for the learning curves (the first ones); the
            last epoch is always evaluated on the whole test set. Default: ``512``.
    """

    epochs: int = 6
    batch_size: int = 64
    lr: float = 4e-3
    weight_decay: float = 5e-4
    eval_batch_size: int = 256
    curve_images: int = 512

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs)
        check_int("batch_size", self.batch_size)
        check_int("eval_batch_size", self.eval_batch_size)
        check_int("curve_images", self.curve_images)
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, but got {value!r}")
        if self.lr == 0:
            raise ValueError("lr must be a finite number > 0, but got 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DistContext:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on the process that evaluates and writes (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when this process belongs to a process group (launched by ``torchrun``, even with one process)."""
        return self.backend is not None


@dataclass
class RunResult:
    """One trained variant under one seed (complete on rank 0; other ranks get ``model=None``)."""

    variant: str
    seed: int
    params: int
    train_seconds: float
    test_accuracy: float
    history: list[dict[str, float]]
    lift: dict[str, float] | None
    model: nn.Module | None
    map_stats: dict[str, dict[str, float]] | None = None


def block_alphas(model: nn.Module) -> dict[str, float]:
    """The blend weight ``alpha`` of every block of ``model`` that blends (block name -> float)."""
    from ..maps import find_blocks

    return {name: float(block.alpha.detach()) for name, block in find_blocks(model).items() if block.alpha is not None}


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; ``"cpu"`` and ``"cuda"`` are taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch.cuda.is_available() is False")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of 'auto', 'cpu', 'cuda', but got {device!r}")
    return torch.device(device)


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the process group when launched by ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set); else one process.

    The backend is NCCL on CUDA and gloo on CPU; under CUDA each process takes the GPU of its ``LOCAL_RANK``.
    """
    target = resolve_device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # not launched by torchrun
        return DistContext(device=target)
    world_size = int(os.environ["WORLD_SIZE"])
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if target.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world_size, device=target, backend=backend)


def teardown_distributed(ctx: DistContext) -> None:
    """Wait for every process, then leave the process group (nothing to do for a single process)."""
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _progress(iterable: Any, enabled: bool, **kwargs: Any) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kwargs)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 256, device: torch.device | None = None) -> dict:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` (in eval mode, restored afterwards).

    Returns:
        dict: ``{"loss": float, "accuracy": float, "predictions": Tensor (N,)}``.
    """
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, predictions = 0.0, []
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].to(device)
        labels = data.labels[start : start + batch_size].to(device)
        logits = model(images)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        predictions.append(logits.argmax(dim=1).cpu())
    model.train(was_training)
    predictions = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.int64)
    accuracy = float((predictions == data.labels).float().mean()) if len(data) else float("nan")
    return {"loss": total_loss / max(1, len(data)), "accuracy": accuracy, "predictions": predictions}


def box_coverage(boxes: Tensor, map_size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """The share of each map cell's area that lies inside each box.

    A map of ``h x w`` cells covers the image of ``H x W`` pixels; cell ``(i, j)`` spans rows
    ``[i H / h, (i + 1) H / h)`` and columns ``[j W / w, (j + 1) W / w)``.

    Args:
        boxes (Tensor): ``(N, 4)`` ``(x0, y0, x1, y1)`` in image pixels, ends exclusive.
        map_size (tuple): ``(h, w)``.
        image_size (tuple): ``(H, W)``.

    Shape:
        - Output: :math:`(N, h, w)` with values in ``[0, 1]``.
    """

    def overlap(lo: Tensor, hi: Tensor, cells: int, pixels: int) -> Tensor:
        edges = torch.arange(cells + 1, dtype=torch.float64) * (pixels / cells)
        start, end = edges[:-1].unsqueeze(0), edges[1:].unsqueeze(0)
        covered = torch.minimum(end, hi.unsqueeze(1)) - torch.maximum(start, lo.unsqueeze(1))
        return covered.clamp(min=0) / (pixels / cells)

    boxes = boxes.to(torch.float64)
    fy = overlap(boxes[:, 1], boxes[:, 3], map_size[0], image_size[0])
    fx = overlap(boxes[:, 0], boxes[:, 2], map_size[1], image_size[1])
    return fy.unsqueeze(2) * fx.unsqueeze(1)


def localisation_lift(sa: Tensor, boxes: Tensor, image_size: tuple[int, int], reduce: bool = True) -> Tensor | float:
    """Share of spatial-attention mass inside each box, divided by the box's share of the image.

    Args:
        sa (Tensor): spatial maps ``(N, 1, h, w)``, non-negative.
        boxes (Tensor): ``(N, 4)`` ``(x0, y0, x1, y1)`` in image pixels, ends exclusive.
        image_size (tuple): ``(H, W)`` of the images the boxes refer to.
        reduce (bool): return the mean over images (a float) rather than one value per image. Default: ``True``.

    Returns:
        float or Tensor: the lift (``1.0`` = chance).
    """
    if sa.dim() != 4 or sa.shape[1] != 1:
        raise ValueError(f"sa must have shape (N, 1, h, w), but got {tuple(sa.shape)}")
    if boxes.shape != (sa.shape[0], 4):
        raise ValueError(f"boxes must have shape ({sa.shape[0]}, 4), but got {tuple(boxes.shape)}")
    mass = sa[:, 0].to(torch.float64)
    coverage = box_coverage(boxes, (mass.shape[1], mass.shape[2]), image_size)
    inside = (mass * coverage).sum(dim=(1, 2)) / mass.sum(dim=(1, 2)).clamp(min=1e-12)
    box_share = coverage.sum(dim=(1, 2)) / (mass.shape[1] * mass.shape[2])
    lift = inside / box_share.clamp(min=1e-12)
    return float(lift.mean()) if reduce else lift


def attention_stats(model: nn.Module, data: ImageSet, batch_size: int = 256) -> dict[str, dict[str, float]] | None:
    """Per block of ``model`` on ``data``: the spatial map's mean, its spread and lift, and the effective factor.

    Returns:
        dict or None: ``{"spatial_mean": {block: float}, "spatial_spread": {block: float}, "lift": {block: float}}``
        (``"lift"`` only when ``data`` has boxes) plus the keys of :func:`~cbam_dsa.demo.effective.effective_stats`
        (``alpha``, ``effective_mean``, ``effective_spread``, ``effective_min``, ``effective_lift``); ``None`` when
        the model holds no block. ``spatial_mean`` near 1.0 means that block's spatial gate is almost fully open
        everywhere; ``spatial_spread`` is the standard deviation of the map within an image, averaged over images.
    """
    from ..maps import find_blocks
    from ..viz import collect_maps
    from .effective import effective_stats

    maps = collect_maps(model, data.images, batch_size=batch_size)
    if not maps:
        return None

    stats = {
        "spatial_mean": {name: float(m.sa.double().mean()) for name, m in maps.items()},
        "spatial_spread": {name: float(m.sa.double().flatten(1).std(dim=1).mean()) for name, m in maps.items()},
    }
    size = (data.images.shape[2], data.images.shape[3])
    if data.boxes is not None:
        stats["lift"] = {name: localisation_lift(m.sa, data.boxes, size) for name, m in maps.items()}
    blocks = find_blocks(model)
    alphas = {name: None if block.alpha is None else float(block.alpha.detach()) for name, block in blocks.items()}
    stats.update(effective_stats(maps, alphas, data.boxes, size))
    return stats


def warmup_cosine(total_steps: int, warmup_share: float = 0.2, floor: float = 0.01) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over ``warmup_share`` of the steps, then cosine to ``floor``."""
    warmup = max(1, round(warmup_share * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _global_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    order = torch.randperm(n, generator=generator)
    full = max(1, n // batch_size)  # the last partial batch is dropped (kept if it is the only one)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(full)]


def train_variant(
    model_config: dict[str, Any],
    train: ImageSet,
    test: ImageSet,
    config: TrainConfig,
    seed: int,
    ctx: DistContext | None = None,
    progress: bool = True,
) -> RunResult:
    """Train one variant from scratch under ``seed`` and evaluate it after every epoch.

    Args:
        model_config (dict): :meth:`DemoNet.get_config` of the model to build.
        train, test (ImageSet): the data.
        config (TrainConfig): the schedule.
        seed (int): seeds the initial weights and the batch order.
        ctx (DistContext, optional): from :func:`setup_distributed`. Default: one process on CPU.
        progress (bool): show tqdm progress bars (rank 0 only). Default: ``True``.

    Returns:
        RunResult: on rank 0 with the trained model (on CPU, eval mode) and its lift; on other ranks the
        same accuracy fields are absent (``nan``) and ``model`` is ``None``.
    """
    ctx = ctx if ctx is not None else DistContext()
    _check_batch(config, ctx)
    torch.manual_seed(seed)
    model = build_model(model_config)
    return train_model(model, train, test, config, seed, ctx, progress, name=model_config.get("variant", "model"))


def _check_batch(config: TrainConfig, ctx: DistContext) -> None:
    if config.batch_size < ctx.world_size:
        raise ValueError(
            f"batch_size ({config.batch_size}) must be at least the number of processes ({ctx.world_size})"
        )


def train_model(
    model: nn.Module,
    train: ImageSet,
    test: ImageSet,
    config: TrainConfig,
    seed: int,
    ctx: DistContext | None = None,
    progress: bool = True,
    name: str = "model",
) -> RunResult:
    """Train ``model`` in place from its current weights (a fresh optimiser and schedule), as :func:`train_variant`.

    Args:
        model (nn.Module): the network; moved to ``ctx.device``, and on rank 0 back to CPU in eval mode at the end.
        train, test (ImageSet): the data.
        config (TrainConfig): the schedule.
        seed (int): seeds the batch order.
        ctx (DistContext, optional): from :func:`setup_distributed`. Default: one process on CPU.
        progress (bool): show tqdm progress bars (rank 0 only). Default: ``True``.
        name (str): the run's name in the progress bar and the result. Default: ``"model"``.

    Returns:
        RunResult: as :func:`train_variant`.
    """
    ctx = ctx if ctx is not None else DistContext()
    _check_batch(config, ctx)
    model = model.to(ctx.device)
    params = sum(p.numel() for p in model.parameters())
    net = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids)
    batches_per_epoch = len(_global_batches(len(train), config.batch_size, torch.Generator()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.epochs * batches_per_epoch))
    images, labels = train.images.to(ctx.device), train.labels.to(ctx.device)
    generator = torch.Generator().manual_seed(seed)
    show = progress and ctx.is_main
    history: list[dict[str, float]] = []
    train_seconds = 0.0
    epochs = _progress(range(config.epochs), show, desc=f"{name} (seed {seed})", unit="epoch", leave=True)
    for epoch in epochs:
        net.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        correct = torch.zeros((), dtype=torch.float64, device=ctx.device)
        count = 0
        batches = _global_batches(len(train), config.batch_size, generator)
        for batch in _progress(batches, show, desc=f"epoch {epoch + 1}", unit="batch", leave=False):
            mine = batch[ctx.rank :: ctx.world_size].to(ctx.device)
            logits = net(images[mine])
            loss = F.cross_entropy(logits, labels[mine])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().double() * len(mine)
            correct += (logits.detach().argmax(1) == labels[mine]).sum().double()
            count += len(mine)
        totals = torch.stack([loss_sum, correct, torch.tensor(float(count), dtype=torch.float64, device=ctx.device)])
        if ctx.distributed:
            import torch.distributed as dist

            dist.all_reduce(totals)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        train_seconds += time.perf_counter() - started
        record = {
            "epoch": epoch + 1,
            "train_loss": float(totals[0] / totals[2]),
            "train_accuracy": float(totals[1] / totals[2]),
            "seconds": train_seconds,
        }
        if ctx.is_main:
            evaluated = test if epoch == config.epochs - 1 else test.subset(config.curve_images)
            result = evaluate(model, evaluated, config.eval_batch_size)
            record.update(test_loss=result["loss"], test_accuracy=result["accuracy"], test_images=len(evaluated))
        alphas = block_alphas(model)
        if alphas:
            record["alpha"] = alphas
            if show:
                epochs.set_postfix(loss=f"{record['train_loss']:.3f}", test_acc=f"{result['accuracy']:.3f}")
        history.append(record)
    if not ctx.is_main:
        return RunResult(name, seed, params, train_seconds, float("nan"), history, None, None)
    model = model.cpu().eval()
    stats = attention_stats(model, test, config.eval_batch_size)
    lift = stats.get("lift") if stats else None
    accuracy = history[-1]["test_accuracy"]
    return RunResult(name, seed, params, train_seconds, accuracy, history, lift, model, stats)
