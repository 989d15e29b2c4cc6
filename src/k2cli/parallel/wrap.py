"""Data-parallel wrappers: DDP (replicated model) or FSDP2 (sharded in place), gradient sync control.

    ddp   DistributedDataParallel: every rank holds the whole model; gradients are all-reduced
          (averaged) during backward.
    fsdp  FSDP2 `fully_shard` on each decoder layer and on the root: parameters, gradients and
          AdamW moments are DTensor row shards (Shard(0)), gathered for forward/backward and
          reduce-scattered (averaged) after it. Each layer RETURNS its side outputs (balance
          loss, expert counts, max logits: model/transformer.py), so FSDP sees them as ordinary
          outputs and the balance loss's gradient enters the layer's own backward.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from k2cli.errors import K2Error
from k2cli.parallel.dtensor import full_tensor, is_dtensor, local
from k2cli.parallel.groups import world_size

PARALLEL = ("ddp", "fsdp")


def wrap(model: torch.nn.Module, parallel: str = "ddp"):
    """The module to run forward/backward through: DDP around `model`, or `model` itself sharded
    in place by FSDP2 (its parameters become DTensor shards). The identity in one process."""
    if world_size() == 1:
        return model
    if parallel == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        device = next(model.parameters()).device
        # Buffers (router correction biases) are updated identically on every rank from the
        # all-reduced expert loads: no need to broadcast them before each forward.
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)
    if parallel == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            raise K2Error("train.parallel=fsdp needs FSDP2 (torch >= 2.6)", "upgrade torch or use train.parallel=ddp")
        for layer in getattr(model, "layers", []):
            fully_shard(layer)  # one all-gather per layer, resharded after its forward
        fully_shard(model)  # the rest: embeddings, final norm, lm_head
        return model
    raise K2Error(f"unknown train.parallel '{parallel}'", "use ddp or fsdp")


def no_sync(module):
    """Skip the gradient reduction of this backward (all but the last micro-batch)."""
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(module)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)



def full_model(model: torch.nn.Module) -> torch.nn.Module:
    """A plain module with the whole weights: `model` itself unless FSDP sharded it, in which case
    a new instance of its class is built from the gathered state (collective)."""
    if not any(is_dtensor(p) for p in model.parameters()):
        return model
    from torch.distributed.fsdp import FSDPModule

    device = local(next(model.parameters())).device
    state = {k: full_tensor(v) for k, v in model.state_dict().items()}
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    plain = cls(model.config)
    plain.load_state_dict(state)
    return plain.to(device)
