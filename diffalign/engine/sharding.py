"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the LoRA runs of `diffalign train` and `diffalign online`.

Asked for by the accelerate launch config (`distributed_type: FSDP`, `fsdp_version: 2`: configs/accelerate/fsdp.yaml),
which `accelerate launch` passes on as ACCELERATE_USE_FSDP / FSDP_VERSION. The engine shards the denoiser itself,
right after its adapters are added (before the optimizer is built), so one code path serves GPUs (NCCL) and the CPU
processes (gloo) the tests launch, where accelerate itself would fall back to DDP:

- one `fully_shard` per repeated block (`family.shard_blocks`, innermost first), then one on the root: every
  parameter, the frozen base and the LoRA adapters ("default", "ref", "old") alike, is a DTensor sharded on dim 0
  over the processes, and a block's parameters are all-gathered inside its forward and freed after it
  (torch/distributed/fsdp/_fully_shard/_fully_shard.py). So every forward, the adapters-off reference and the "ref"
  / "old" adapters included, runs through the module itself, and every process must run the same forwards;
- `train.mixed_precision: bf16` becomes FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the
  stored LoRA parameters and AdamW's state stay fp32 shards, the all-gathered copies compute in bf16, gradients are
  reduce-scattered in fp32 (FSDP2 averages them over processes, as DDP does). fp16 (a GradScaler over DTensor
  gradients) is refused;
- checkpoints and the LoRA file: `full_tensors` / `full_optimizer_state` gather the sharded tensors on every process
  (collectives), rank 0 writes the usual files, so a checkpoint is the same format as a DDP or one-process run's and
  `place_like` shards it back on load: it resumes with any process count.

- generation outside the rounds (the held-out evaluation, the curve points): `generate_shared` gives every process an
  equal share of the images (padded, so each runs the same forwards) and gathers them, in order, on the main
  process, which scores them and writes the report.

Not sharded: the text encoders and the VAE (each process holds them; a finished latent cache trains without them).
"""

from __future__ import annotations

import os

import torch
from accelerate.utils import gather_object
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from diffalign.errors import DiffalignError


def fsdp_requested() -> bool:
    """Whether `accelerate launch` was given an FSDP config; FSDP1 (`fsdp_version: 1`) is refused with one line."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise DiffalignError(
            "FSDP1 is not used by diffalign: set fsdp_version: 2 in the accelerate config "
            "(configs/accelerate/fsdp.yaml)"
        )
    return True


def shard_denoiser(denoiser: torch.nn.Module, blocks: tuple[str, ...], mixed_precision: str) -> int:
    """`fully_shard` every module whose class name is in `blocks` (innermost first), then the root; returns how
    many blocks were sharded. Call after the adapters are added and before the optimizer is built (the parameters
    are replaced by DTensors)."""
    if mixed_precision == "fp16":
        raise DiffalignError("train.mixed_precision=fp16 with FSDP2: use bf16 (no loss scaler over sharded gradients)")
    if not blocks:
        raise DiffalignError(f"FSDP2: {type(denoiser).__name__} names no blocks to shard (family.shard_blocks)")
    dtype = torch.bfloat16 if mixed_precision == "bf16" else None
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    wanted = set(blocks)
    found = [m for m in denoiser.modules() if type(m).__name__ in wanted and m is not denoiser]
    if not found:
        raise DiffalignError(
            f"FSDP2: no module of {sorted(wanted)} in {type(denoiser).__name__} (family.shard_blocks)"
        )
    for module in reversed(found):  # pre-order reversed: a nested block is sharded before the block around it
        fully_shard(module, mp_policy=policy)
    fully_shard(denoiser, mp_policy=policy)
    # FSDP2 fixes each block's gradient dtype at its first forward from the parameters that then require grad
    # (_fsdp_param_group.py _init_mp_dtypes); that forward may be the adapters-off reference or the "old" adapter's
    # sampling (nothing trainable: the fp32 LoRA and bf16 base look mixed, and the bf16 gradients would not be cast
    # back). So initialise now, with the trained adapter active.
    denoiser._get_fsdp_state()._lazy_init()
    return len(found)


def is_sharded(param: torch.Tensor) -> bool:
    return isinstance(param, DTensor)


def param_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes this process holds, bytes of the whole model) of the frozen base's parameters (the LoRA adapters,
    "lora_" in the name, left out)."""
    local = total = 0
    for name, p in module.named_parameters():
        if "lora_" in name:
            continue
        size = p.element_size()
        total += p.numel() * size
        local += (p.to_local() if is_sharded(p) else p).numel() * size
    return local, total


def full_tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: the whole tensor on the CPU}: sharded ones all-gathered (a collective: call on every process)."""
    return {n: (p.full_tensor() if is_sharded(p) else p).detach().cpu() for n, p in named.items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's `state_dict()` with its sharded state (AdamW's moments) all-gathered to the CPU (every process)."""
    sd = optimizer.state_dict()
    state = {
        idx: {k: (v.full_tensor().cpu() if is_sharded(v) else v) for k, v in entry.items()}
        for idx, entry in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]}


def place_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `param`: this process's shard when `param` is sharded (no communication: every process
    read the same file), else `full` itself."""
    if not is_sharded(param):
        return full
    return distribute_tensor(
        full.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements, src_data_rank=None
    )


def generate_shared(family, accelerator, prompts: list[str], seeds: list[int], kw: dict, batch: int = 64):
    """`family.generate(prompts, seeds=seeds, **kw)` over the processes of a sharded run: each takes a contiguous
    share of ceil(N / world) images, padded with copies of the last one so that every process runs the same forwards
    (each block's all-gather is collective). The main process gets the N images in order; the others get None.
    Every process must call it."""
    n, world, rank = len(prompts), accelerator.num_processes, accelerator.process_index
    per = -(-n // world)
    share = [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)]
    images = []
    for start in range(0, per, batch):
        chunk = share[start : start + batch]
        images += family.generate([prompts[i] for i in chunk], seeds=[seeds[i] for i in chunk], **kw)
    parts = gather_object([images])  # one list per process, in rank order
    return [im for part in parts for im in part][:n] if accelerator.is_main_process else None


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): torch.cuda.max_memory_allocated on a GPU, else the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "max RSS (CPU)"
