"""The retrofit experiment: add the block to a network that is already trained, starting as the identity.

This is how most users meet an attention block: inserted into a backbone they trained before. Per seed:

1. train the plain network (variant ``none``) with the demo's schedule;
2. insert the block into every stage with ``alpha_init=0`` and a learned ``alpha`` (:func:`insert_blocks`). With
   ``alpha = 0`` the block returns its input, ``x + 0 * (y - x) = x``, so the network computes exactly what it
   computed before; :func:`retrofit_experiment` checks this on the test set (``torch.equal`` of the logits);
3. fine-tune it for a fixed budget;
4. fine-tune a copy of the plain network with the same data, seed (batch order), schedule and budget.

Step 4 is the control: the gap between 3 and 4 is what the block adds, not what more training adds.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .data import ImageSet
from .distributed import DistContext
from .model import DemoNet
from .train import RunResult, TrainConfig, train_model

__all__ = ["RETROFIT_VARIANT", "RetrofitResult", "insert_blocks", "retrofit_experiment", "same_outputs"]

RETROFIT_VARIANT = "dsa-zero-start"


@dataclass
class RetrofitResult:
    """One seed of the retrofit experiment (complete on rank 0; other ranks get ``None`` for the runs' models).

    Attributes:
        seed (int): the seed of every step.
        pretrained (RunResult): step 1, the plain network trained from scratch.
        exact (bool or None): whether the retrofitted network's test logits equal the plain network's exactly
            before fine-tuning (``None`` on ranks other than 0).
        plain (RunResult): step 4, the plain network fine-tuned.
        retrofit (RunResult): step 3, the retrofitted network fine-tuned.
    """

    seed: int
    pretrained: RunResult
    exact: bool | None
    plain: RunResult
    retrofit: RunResult


def insert_blocks(plain: DemoNet, attention: dict[str, Any] | None = None) -> DemoNet:
    """A ``dsa-zero-start`` copy of ``plain``: its weights, with the block (``alpha = 0``) in every stage.

    The block's own weights are drawn from the global random generator (seed it for a repeatable draw); the
    backbone's come from ``plain``, which is left unchanged.

    Args:
        plain (DemoNet): a network of variant ``"none"``.
        attention (dict, optional): extra block arguments (``alpha_init`` and ``learnable_alpha`` are fixed by
            the variant). Default: ``None``.

    Returns:
        DemoNet: the retrofitted network, in the training mode of ``plain``, on its device.

    Raises:
        TypeError: if ``plain`` is not a :class:`DemoNet`.
        ValueError: if ``plain`` already holds attention.
    """
    if not isinstance(plain, DemoNet):
        raise TypeError(f"plain must be a DemoNet, but got {type(plain).__name__}")
    config = plain.get_config()
    if config["variant"] != "none":
        raise ValueError(f"plain must be a DemoNet of variant 'none', but got variant {config['variant']!r}")
    device = next(plain.parameters()).device
    retrofitted = DemoNet(**(config | {"variant": RETROFIT_VARIANT, "attention": dict(attention or {})})).to(device)
    missing, unexpected = retrofitted.load_state_dict(plain.state_dict(), strict=False)
    stray = [key for key in missing if ".attention." not in key]
    if stray or unexpected:  # the backbones differ: a bug, not a user error
        raise RuntimeError(f"backbone keys do not match: missing {stray}, unexpected {list(unexpected)}")
    return retrofitted.train(plain.training)


@torch.no_grad()
def same_outputs(first: nn.Module, second: nn.Module, images: Tensor, batch_size: int = 256) -> bool:
    """Whether two networks give exactly equal outputs (``torch.equal``) on ``images``, both in eval mode.

    Shape:
        - images: :math:`(N, C, H, W)`
    """
    modes = first.training, second.training
    first.eval()
    second.eval()
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size]
            if not torch.equal(first(batch), second(batch)):
                return False
        return True
    finally:
        first.train(modes[0])
        second.train(modes[1])


def retrofit_experiment(
    train: ImageSet,
    test: ImageSet,
    pretrain: TrainConfig,
    finetune: TrainConfig,
    seed: int,
    ctx: DistContext | None = None,
    num_classes: int = 10,
    in_channels: int = 1,
    attention: dict[str, Any] | None = None,
    progress: bool = True,
    widths: Sequence[int] = (16, 32, 64),
) -> RetrofitResult:
    """Steps 1 to 4 of the module docstring for one seed.

    Args:
        train, test (ImageSet): the data.
        pretrain (TrainConfig): the schedule of step 1.
        finetune (TrainConfig): the schedule of steps 3 and 4 (a fresh optimiser and warm-up for each).
        seed (int): seeds step 1's weights, the block's weights and every batch order.
        ctx (DistContext, optional): from :func:`~cbam_dsa.demo.distributed.setup_distributed`.
            Default: one CPU process.
        num_classes (int): classes of the task. Default: ``10``.
        in_channels (int): image channels. Default: ``1``.
        attention (dict, optional): extra block arguments. Default: ``None``.
        progress (bool): show progress bars (rank 0 only). Default: ``True``.
        widths (Sequence[int]): channels of each stage. Default: ``(16, 32, 64)``.

    Returns:
        RetrofitResult: the three runs and the exactness check.
    """
    ctx = ctx if ctx is not None else DistContext()
    torch.manual_seed(seed)
    pretrained_net = DemoNet("none", num_classes=num_classes, in_channels=in_channels, widths=widths)
    pretrained = train_model(pretrained_net, train, test, pretrain, seed, ctx, progress, name="none")
    plain = copy.deepcopy(pretrained_net)  # trained in place on every rank (the result holds it on rank 0 only)
    torch.manual_seed(seed)
    retrofitted = insert_blocks(plain, attention)
    exact = same_outputs(plain, retrofitted, test.images, finetune.eval_batch_size) if ctx.is_main else None
    plain_run = train_model(plain, train, test, finetune, seed, ctx, progress, name="none (fine-tuned)")
    retrofit_name = f"{RETROFIT_VARIANT} (retrofit)"
    retrofit_run = train_model(retrofitted, train, test, finetune, seed, ctx, progress, name=retrofit_name)
    return RetrofitResult(seed, pretrained, exact, plain_run, retrofit_run)
