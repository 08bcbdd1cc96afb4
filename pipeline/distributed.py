"""Distributed data-parallel training on torch's own engine (torchrun + DistributedDataParallel).

`cytopipe train --nproc N` re-launches the same command under torchrun. Each process then finds
RANK / WORLD_SIZE / LOCAL_RANK in its environment; `Context.from_env()` joins the process group
(nccl when the process trains on CUDA, gloo on CPU). Rank 0 alone writes checkpoints, reports
and MLflow; every rank trains.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass

from pipeline.errors import CytopipeError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def env_world_size() -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @staticmethod
    def env_is_main() -> bool:
        return int(os.environ.get("RANK", "0")) == 0

    @classmethod
    def from_env(cls, cuda: bool) -> "Context":
        """Join the process group when launched by torchrun; a plain process is world size 1."""
        world = cls.env_world_size()
        if world <= 1:
            return cls()
        import torch.distributed as dist

        _die_with_launcher()
        backend = "nccl" if cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(
            dist.get_rank(),
            world,
            int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
            backend,
        )

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def sync_buffers(self, module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank."""
        if self.enabled:
            import torch.distributed as dist

            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)

    def broadcast_floats(self, values: list[float]) -> list[float]:
        """Rank 0's values on every rank (tensors, not pickled objects)."""
        if not self.enabled:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(t, src=0)
        return t.tolist()

    def gather_digests(self, digest: str) -> list[str]:
        """Every rank's hex sha256, in rank order."""
        if not self.enabled:
            return [digest]
        import torch
        import torch.distributed as dist

        mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)
        out = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        return [bytes(t.tolist()).hex() for t in out]

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _die_with_launcher() -> None:
    """A worker outlives a killed torchrun otherwise (gloo needs no launcher once joined),
    and would go on writing checkpoints beside the rerun. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the line above
        os._exit(1)


def state_digest(state_dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (layout-independent)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def torchrun_args(forward_argv: list[str], nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None) -> list[str]:
    """torchrun's arguments to run `cytopipe <forward_argv>` in `nproc` processes per node.
    Several nodes meet at `rdzv_endpoint` (c10d rendezvous); run the same command on each."""
    args = [f"--nproc-per-node={nproc}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise LaunchError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        args += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        args += ["--standalone"]
    return args + ["-m", "pipeline.cli", *forward_argv]


class LaunchError(CytopipeError, RuntimeError):
    """A distributed launch that cannot start or whose workers failed. One line."""


def launch(forward_argv: list[str], nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None) -> int:
    """Run torchrun in this process (its own launcher, not a copy); 0 when every worker succeeded."""
    if nproc < 1 or nnodes < 1:
        raise LaunchError("--nproc and --nnodes must be at least 1")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun would set 1 thread per worker (with a warning); share the cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        run(get_args_parser().parse_args(torchrun_args(forward_argv, nproc, nnodes, rdzv_endpoint)))
    except ChildFailedError as exc:
        failures = ", ".join(f"rank {rank} exit code {f.exitcode}" for rank, f in sorted(exc.failures.items()))
        raise LaunchError(f"distributed training failed ({failures}); the workers' messages are above") from None
    return 0
