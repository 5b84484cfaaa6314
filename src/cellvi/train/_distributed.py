r"""Data-parallel training with ``torch.distributed``: the same script on N processes.

Launch a training script with ``torchrun --nproc_per_node N script.py`` (or several machines
with ``--nnodes`` and a rendezvous endpoint), or the command line with ``cellvi train ...
--nproc N``. Each process trains the same model on its share of the cells:

* the train/validation split is the one process 0 draws (broadcast), and the model's initial
  parameters are process 0's (broadcast);
* every epoch, the same seeded permutation of the training cells (or of their chunks, out of
  core) is split across the processes without overlap, each making the same number of steps;
  ``batch_size`` stays the *global* batch size, so each process takes ``batch_size / N`` cells
  per step and one step of N processes is one step of one process;
* after the gradients of a step are computed (by autograd or by the module's fused step, which
  writes them), they are all-reduced and averaged before the optimizer steps, so every process
  makes the same update;
* batch normalisation's running statistics are averaged across processes after each epoch's
  training steps, so that every process holds the same model;
* the epoch's training and validation sums are all-reduced before they are summarised, so the
  history, the learning-rate schedule and early stopping see the same metrics on every process
  and stop together;
* only process 0 shows a progress bar and writes checkpoints and saved models.

The backend is ``gloo`` on the CPU (loopback works) and ``nccl`` on GPUs.
"""

from __future__ import annotations

import atexit
import os

import numpy as np
import torch
from torch import nn

__all__ = ["all_reduce_gradients", "average_buffers", "broadcast_array", "broadcast_module",
           "gather_rows", "init_from_env", "rank_world", "reduce_totals"]


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` when not distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device) -> bool:
    """Join the process group ``torchrun`` set up (``WORLD_SIZE > 1``); return whether we did.

    ``gloo`` for the CPU, ``nccl`` for CUDA devices (each process on its ``LOCAL_RANK`` GPU).
    """
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    atexit.register(_shutdown)
    return True


def _shutdown() -> None:
    """At exit: wait for every process, then close the group this module opened.

    Without it, the first process to exit closes its gloo connections while the others still
    hold theirs, and a peer's gloo thread can abort the process ("terminate called without an
    active exception", exit -6: seen in a full-suite run of the two-process test on a loaded
    2-core machine).
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def broadcast_module(module: nn.Module) -> None:
    """Give every process process 0's parameters and buffers."""
    with torch.no_grad():
        for tensor in module.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)


def broadcast_array(values: np.ndarray) -> np.ndarray:
    """Process 0's integer array, on every process (the train/validation split)."""
    dist = torch.distributed
    size = torch.tensor([len(values)], dtype=torch.int64)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size.item()), dtype=torch.int64)
    if dist.get_rank() == 0:
        buffer.copy_(torch.from_numpy(np.asarray(values, dtype=np.int64)))
    dist.broadcast(buffer, src=0)
    return buffer.numpy()


def all_reduce_gradients(module: nn.Module) -> None:
    """Average every parameter's gradient over the processes (one flat all-reduce)."""
    dist = torch.distributed
    world = dist.get_world_size()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def average_buffers(module: nn.Module) -> None:
    """Average batch normalisation's running statistics over the processes."""
    dist = torch.distributed
    world = dist.get_world_size()
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
                for buf in (mod.running_mean, mod.running_var):
                    dist.all_reduce(buf)
                    buf /= world


def reduce_totals(totals) -> None:
    """Sum an epoch's :class:`~cellvi.train.EpochTotals` over the processes."""
    values = totals.as_tensor()
    torch.distributed.all_reduce(values)
    totals.load_tensor(values)


def gather_rows(part: np.ndarray) -> np.ndarray:
    """Every process's rows, in process order (each gave a contiguous share)."""
    dist = torch.distributed
    world = dist.get_world_size()
    parts: list = [None] * world
    # queries run under torch.inference_mode; the collective's own buffers must be normal
    # tensors (torch 2.4 updates them in place: "Inplace update to inference tensor")
    with torch.inference_mode(False):
        dist.all_gather_object(parts, part)
    return np.concatenate(parts, axis=0)
