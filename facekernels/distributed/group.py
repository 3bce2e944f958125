"""The process group every distributed module starts from."""

import torch.distributed as dist


def world_size(owner, group):
    """The group's world size; a RuntimeError naming `owner` when torch.distributed has no
    process group yet."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{owner}: torch.distributed is not initialized (call "
                           "torch.distributed.init_process_group first, e.g. under torchrun)")
    return dist.get_world_size(group)
