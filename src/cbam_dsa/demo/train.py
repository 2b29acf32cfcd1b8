"""The demo's training loop: seeded, with progress bars, on one process or under ``torchrun`` (DDP).

Every variant is trained with the same data, seed, optimiser, schedule and number of steps. Under
``torchrun --nproc_per_node=N`` each process takes ``1/N`` of every global batch (so the global batches and the
schedule are those of a single process), gradients are averaged by DDP (gloo on CPU, NCCL on GPU), and only rank 0
evaluates, keeps the model and writes anything. The process setup is in :mod:`cbam_dsa.demo.distributed`, the
localisation lift (:func:`~cbam_dsa.demo.localisation.localisation_lift`) in :mod:`cbam_dsa.demo.localisation`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from .data import ImageSet
from .distributed import DistContext
from .localisation import localisation_lift
from .model import build_model

__all__ = [
    "RunResult",
    "TrainConfig",
    "attention_stats",
    "block_alphas",
    "evaluate",
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
        ctx (DistContext, optional): from :func:`~cbam_dsa.demo.distributed.setup_distributed`.
            Default: one process on CPU.
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
        ctx (DistContext, optional): from :func:`~cbam_dsa.demo.distributed.setup_distributed`.
            Default: one process on CPU.
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
