"""The DP x CP x TP process mesh and the small context object layers receive.

Ranks are laid out with TP fastest, then CP, then DP: the TP group (heaviest traffic, every layer)
spans neighbouring ranks, which torchrun places on the same node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


@dataclass(frozen=True)
class ParallelContext:
    """Process groups of one rank. Every primitive is the identity on a group of one rank; None stands
    for that group outside a distributed job."""

    tp_group: ProcessGroup | None = None
    cp_group: ProcessGroup | None = None
    dp_group: ProcessGroup | None = None
    dp_cp_group: ProcessGroup | None = None  # parameters' gradients are summed over this one
    sequence_parallel: bool = False

    @property
    def tp(self) -> int:
        return group_size(self.tp_group)

    @property
    def tp_rank(self) -> int:
        return group_rank(self.tp_group)

    @property
    def cp(self) -> int:
        return group_size(self.cp_group)

    @property
    def cp_rank(self) -> int:
        return group_rank(self.cp_group)

    @property
    def dp(self) -> int:
        return group_size(self.dp_group)

    @property
    def dp_rank(self) -> int:
        return group_rank(self.dp_group)


def mesh_ranks(world_size: int, tp: int, cp: int) -> dict[str, list[list[int]]]:
    """The rank lists of every TP, CP, DP and DP x CP group (TP fastest, then CP, then DP)."""
    dp = world_size // (tp * cp)
    rank = lambda d, c, t: (d * cp + c) * tp + t  # noqa: E731
    return {
        "tp": [[rank(d, c, t) for t in range(tp)] for d in range(dp) for c in range(cp)],
        "cp": [[rank(d, c, t) for c in range(cp)] for d in range(dp) for t in range(tp)],
        "dp": [[rank(d, c, t) for d in range(dp)] for c in range(cp) for t in range(tp)],
        "dp_cp": [[rank(d, c, t) for d in range(dp) for c in range(cp)] for t in range(tp)],
    }


def _join_job(backend: str) -> None:
    """init_process_group from torchrun's environment.

    Where torchrun's agents share their rendezvous store with the workers (its default), workers restarted after a
    failure reach the store of the attempt before and would find the dead workers' addresses under the same keys:
    each attempt joins under a prefix of its own, TORCHELASTIC_RESTART_COUNT. That count names the same attempt on
    every rank only on one node (a node restarted for another node's failure does not count it), so several nodes
    that may restart need a store per attempt (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as megassm.torchrun sets for
    them; on one node the shared store is kept: a store per attempt listens on a port found free, which another
    process may take meanwhile)."""
    store, rank, world = next(dist.rendezvous("env://"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        if int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0:
            raise ValueError("torchrun --max-restarts on several nodes needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the "
                             "environment of every node's torchrun (launch/torchrun.sh and python -m megassm.torchrun set it)")
        store = dist.PrefixStore(f"megassm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def init_parallel(tp: int = 1, cp: int = 1, dp: int = -1, sequence_parallel: bool = False, backend: str | None = None) -> ParallelContext:
    """Join the job started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR, ...) and build the mesh.
    dp = -1 takes the rest of the world. Backend: NCCL with CUDA, gloo otherwise."""
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        _join_job(backend)
    world = dist.get_world_size()
    if dp == -1:
        dp = world // (tp * cp)
    if tp * cp * dp != world:
        raise ValueError(f"parallel.tp * parallel.cp * parallel.dp = {tp} * {cp} * {dp} = {tp * cp * dp}, but the world size is {world}")
    if sequence_parallel and tp == 1:
        raise ValueError("parallel.sequence_parallel = true needs parallel.tp > 1")
    mine = {}
    for name, groups in mesh_ranks(world, tp, cp).items():
        for ranks in groups:  # every rank creates every group, in the same order
            group = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                mine[name] = group  # kept when of size one too: engines such as DeepSpeed want real groups
    return ParallelContext(mine["tp"], mine["cp"], mine["dp"], mine["dp_cp"], sequence_parallel)
