"""`train.compile`: torch.compile the denoiser in place, per repeated block or whole.

- "blocks" (regional compilation, https://docs.pytorch.org/tutorials/recipes/regional_compilation.html): each
  outermost module whose class is one of the family's repeated blocks (`family.shard_blocks`, the units FSDP2 shards
  by) gets `module.compile()`. Blocks of one class and configuration share a graph, so a 57-block FLUX compiles a
  few graphs, not 57: the shortest compile.
- "model": `denoiser.compile()`, one graph over the whole forward: the longest compile, and the fewest graph
  boundaries (on the tiny SD3 on a CPU its forward + backward ran 10-20% faster than the blocks' in two runs).

Either way the modules and their parameter names stay as they are (no `_orig_mod.` prefix), so adapters are added,
switched (the reference, "ref", "old"), saved and loaded as without it. Each distinct situation compiles on first use:
with and without grad, each adapter on or off, a second batch size (then dynamic shapes). The first rounds or steps pay
for that, the later ones run faster (benchmarks/online_peer.py measures both against Flow-GRPO's trainer).
"""

from __future__ import annotations

import torch

from diffalign.errors import DiffalignError


def compile_blocks(denoiser: torch.nn.Module, blocks: tuple[str, ...]) -> int:
    """`compile()` every outermost module of `denoiser` whose class name is in `blocks`; returns how many."""
    wanted = set(blocks)
    count = 0

    def visit(module: torch.nn.Module) -> None:
        nonlocal count
        for child in module.children():
            if type(child).__name__ in wanted:
                child.compile()
                count += 1
            else:
                visit(child)

    visit(denoiser)
    if not count:
        raise DiffalignError(
            f"train.compile=blocks: no block of {sorted(wanted) or 'its family'} in {type(denoiser).__name__}; "
            "use train.compile=model"
        )
    return count


def compile_model(denoiser: torch.nn.Module, blocks: tuple[str, ...]) -> int:
    """`compile()` the whole denoiser; returns 1."""
    denoiser.compile()
    return 1


COMPILE = {"blocks": compile_blocks, "model": compile_model}
"""`train.compile` -> how the denoiser is compiled ("none": not at all)."""
