"""Cross-worker operations over the process group Ray Train sets up (``torch.distributed``).

Methods reach these only through :class:`~xmodal.methods.base.MethodContext` (``all_gather``,
``all_reduce``); in one process the base :class:`~xmodal.methods.base.Collectives` is used instead,
where every operation is the identity. Nothing here imports Ray.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from xmodal.errors import ConfigError
from xmodal.methods.base import REDUCE_OPS, Collectives

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class _GatherWithGradient(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every worker's gradient of the local shard.

    With DDP averaging parameter gradients over W workers afterwards, this makes the result the
    gradient of the mean of the per-worker losses, as if computed in one process (see
    :meth:`~xmodal.methods.base.MethodContext.all_gather`).
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, sizes: list[int], rank: int, group: Any) -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        largest = max(sizes)
        padded = tensor.new_zeros((largest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded.contiguous(), group=group)
        return torch.cat([part[:size] for part, size in zip(gathered, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


class DistributedCollectives(Collectives):
    """Collectives over an initialised ``torch.distributed`` process group.

    Args:
        device: This worker's device; tensors are moved there for the collective (NCCL needs
            CUDA tensors) and returned on the device they came from.
        group: Process group (default: the world).
    """

    def __init__(self, device: torch.device, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedCollectives needs an initialised torch.distributed process group")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")

    def _sizes(self, tensor: torch.Tensor) -> list[int]:
        size = torch.tensor([tensor.shape[0]], device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        return [int(s) for s in sizes]

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 0:
            raise ConfigError("all_gather needs a tensor with a batch axis (dim 0); use all_reduce for scalars")
        origin = tensor.device
        local = tensor.to(self.device)
        gathered = _GatherWithGradient.apply(local, self._sizes(local), self.rank, self.group)
        return gathered.to(origin)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op not in REDUCE_OPS:
            raise ConfigError(f"all_reduce op={op!r}; expected one of {list(REDUCE_OPS)}")
        origin, dtype = tensor.device, tensor.dtype
        work = tensor.detach().to(self.device, dtype=torch.float64 if dtype.is_floating_point else dtype).clone()
        dist.all_reduce(work, op=_OPS["sum" if op == "mean" else op], group=self.group)
        if op == "mean":
            work = work / self.world_size
        return work.to(origin, dtype=dtype)

    def all_gather_object(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def broadcast_(self, tensor: torch.Tensor, source: int = 0) -> None:
        """Overwrite ``tensor`` (in place) with worker ``source``'s."""
        work = tensor.detach().to(self.device)
        dist.broadcast(work, src=source, group=self.group)
        if work is not tensor:
            tensor.data.copy_(work.to(tensor.device))


def current_collectives(device: torch.device) -> Collectives:
    """Distributed collectives when a process group with several workers is up, else the identity."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedCollectives(device)
    return Collectives()
