"""`train.compile` (diffalign/engine/compiling.py): which modules are compiled, that nothing is renamed, and that an
on-line GRPO run compiled by inductor learns the same LoRA as the eager run. Slow: the inductor compile on a CPU."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.engine.compiling import COMPILE
from diffalign.errors import DiffalignError
from diffalign.lora import add_lora
from diffalign.models import load_family

REPO = Path(__file__).resolve().parents[1]


def compiled(module: torch.nn.Module) -> bool:
    return module._compiled_call_impl is not None


@pytest.mark.parametrize("model,blocks", [("sd3", 2), ("sd15", 8)])
def test_blocks_compiles_the_outermost_repeated_blocks_and_renames_nothing(model, blocks):
    family = load_family(str(REPO / f"assets/tiny/{model}"), load_encoders=False)
    denoiser = family.denoiser
    add_lora(denoiser, 4, 4.0, ["to_q", "to_k", "to_v"], "gaussian")
    names = [n for n, _ in denoiser.named_parameters()]
    assert COMPILE["blocks"](denoiser, family.shard_blocks) == blocks
    wanted = set(family.shard_blocks)
    tops = [m for m in denoiser.modules() if compiled(m)]
    assert len(tops) == blocks and all(type(m).__name__ in wanted for m in tops)
    for top in tops:  # outermost only: nothing inside a compiled block is compiled again
        assert not any(compiled(m) for m in top.modules() if m is not top)
    assert [n for n, _ in denoiser.named_parameters()] == names and not compiled(denoiser)


def test_model_compiles_the_denoiser_itself_and_blocks_needs_named_blocks():
    family = load_family(str(REPO / "assets/tiny/sd3"), load_encoders=False)
    names = list(family.denoiser.state_dict())
    assert COMPILE["model"](family.denoiser, ()) == 1 and compiled(family.denoiser)
    assert list(family.denoiser.state_dict()) == names  # no `_orig_mod.` prefix
    with pytest.raises(DiffalignError, match="train.compile=blocks: no block of .*use train.compile=model"):
        COMPILE["blocks"](torch.nn.Sequential(torch.nn.Linear(2, 2)), ("JointTransformerBlock",))


GRPO = [
    "model.path=assets/tiny/sd3",
    "lora.rank=4",
    "lora.alpha=4",
    "objective.name=grpo",
    "objective.beta=0.04",  # the adapters-off reference forward too: its own graph
    "sampling.prompts_per_round=2",
    "sampling.images_per_prompt=2",
    "sampling.shared_noise=false",
    "sampling.steps=3",
    "sampling.guidance=2.0",
    "train.steps_per_round=2",
    "train.batch_size=4",
    "train.lr=1e-3",
    "reward.scorer=toy_aesthetic",
    "reward.monitor=[]",
    "online.rounds=2",
    "train.tensorboard=false",
    "eval.prompts=",
]


@pytest.mark.slow(minutes=3)
def test_online_grpo_compiled_by_inductor_learns_the_eager_runs_lora(tmp_path, monkeypatch, capsys):
    """Two GRPO rounds with the adapters-off KL reference: `train.compile=model` (inductor's C++ kernels) logs the
    same rounds and saves the same LoRA as the eager run, up to float reordering."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold compile, as on a fresh machine
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\nblue bird\n")
    outs = {}
    for mode in ("none", "model"):
        outs[mode] = tmp_path / mode
        run(None, [*GRPO, f"sampling.prompts={prompts}", f"train.compile={mode}", f"train.output_dir={outs[mode]}"])
    assert "train.compile=model: 1 module(s) of the denoiser compile at first use" in capsys.readouterr().out
    assert list((tmp_path / "inductor").rglob("*.so")), "inductor compiled no kernels"
    rows = {m: [json.loads(line) for line in (o / "rounds.jsonl").read_text().splitlines()] for m, o in outs.items()}
    for eager, comp in zip(rows["none"], rows["model"], strict=True):
        for key, tol in (("reward", 1e-5), ("train/ratio", 3e-5), ("train/kl", 1e-8), ("train/loss", 3e-5)):
            assert comp[key] == pytest.approx(eager[key], rel=1e-3, abs=tol), key
    eager, comp = (load_file(o / "lora" / "pytorch_lora_weights.safetensors") for o in outs.values())
    assert eager.keys() == comp.keys()
    ups = [k for k in eager if "lora_B" in k or "lora.up" in k]
    assert ups and any(eager[k].abs().max() > 0 for k in ups)  # B starts at 0: the two rounds moved it
    # AdamW moves each weight by about lr per step whatever its gradient's size, so a gradient near 0 turns float
    # reordering into a visible step: the bound is 5% of the two steps' reach (2 x lr 1e-3)
    for key in eager:
        torch.testing.assert_close(comp[key], eager[key], rtol=0, atol=1e-4)
