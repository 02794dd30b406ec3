"""Two real processes on CPU (gloo) for tests of data-parallel code: a free port, a process group,
a method context as the engine builds one, and a spawn that hands each worker its rank and port.

Workers must be module-level functions ``worker(rank, port, *args)`` (spawned processes import them).
"""

from __future__ import annotations

import os
import socket
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xmodal.engine.session import free_port
from xmodal.methods.base import MethodContext

WORLD = 2


def free_ports(names: list[str] | tuple[str, ...]) -> dict[str, int]:
    """A distinct TCP port free on 127.0.0.1 now for each name.

    Every probe stays bound until all are chosen: probes closed one by one may be handed the same
    port twice (a `ray start` given two equal ports refuses to start).
    """
    with ExitStack() as probes:
        ports = {}
        for name in names:
            probe = probes.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            ports[name] = int(probe.getsockname()[1])
        return ports


def spawn(worker: Callable[..., None], *args: Any, world: int = WORLD) -> None:
    """Run ``worker(rank, port, *args)`` in ``world`` fresh processes and wait for them."""
    mp.start_processes(worker, args=(free_port(), *args), nprocs=world, start_method="spawn")


@contextmanager
def process_group(rank: int, port: int, world: int = WORLD) -> Iterator[None]:
    """A gloo process group on 127.0.0.1 for this worker, one torch thread, torn down after."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def method_context(rank: int, world: int = WORLD) -> MethodContext:
    """What the engine gives a method on worker ``rank``: DDP-wrapped networks, real collectives."""
    from xmodal.engine.collectives import DistributedCollectives

    return MethodContext(
        torch.device("cpu"), rank=rank, world_size=world, log=lambda line: None,
        prepare_module=lambda module, **_: torch.nn.parallel.DistributedDataParallel(module),
        collectives=DistributedCollectives(torch.device("cpu")),
    )
