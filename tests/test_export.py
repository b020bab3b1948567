"""LoRA in and out: `diffalign export` to kohya (A1111 / ComfyUI key names) and back, on the tiny SD1.5 / SDXL
pipelines; plain diffusers loads the kohya file to the same outputs, and diffalign's loader reads kohya files."""

from pathlib import Path

import pytest
import torch
from diffalign.pipelines.cli import main
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from diffalign.lora import add_lora, load_lora, read_metadata, save_lora
from diffalign.models import load_family

TINY = Path(__file__).resolve().parents[1] / "assets" / "tiny"
PIPES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
RANK, ALPHA = 4, 8  # alpha != rank: a lost alpha doubles or halves every LoRA delta
# one attention projection, as kohya sd-scripts / A1111 / ComfyUI name it for SD1.5 (diffusers module path, "_")
SD15_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def inputs(fam):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([20, 600]),
        fam.encode_prompts(["a photo of a cat", "dog"]),
    )


def out(fam, xt, t, cond):
    with torch.no_grad():
        return fam.denoise(xt, t, cond)


def trained_lora(name, folder):
    """A LoRA with nonzero B (as after training), saved in diffusers format; returns (its outputs, inputs)."""
    fam = load_family(str(TINY / name))
    add_lora(fam.denoiser, RANK, ALPHA, fam.lora_target_modules)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in fam.denoiser.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_lora(fam, folder, metadata={"objective": "dpo"})
    xt, t, cond = inputs(fam)
    return out(fam, xt, t, cond), (xt, t, cond)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_kohya_round_trip_keeps_outputs_and_alpha(name, tmp_path):
    policy, (xt, t, cond) = trained_lora(name, tmp_path / "lora")
    kohya = tmp_path / "kohya.safetensors"
    assert main(["export", f"src={tmp_path / 'lora'}", f"out={kohya}", "format=kohya"]) == 0

    with safe_open(str(kohya), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys)
    modules = {k.split(".")[0] for k in keys}
    assert keys == {m + s for m in modules for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    assert all(a.ndim == 0 and a.item() == ALPHA for a in alphas.values())  # the real alpha, not the rank
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (str(RANK), str(ALPHA))
    if name == "sd15":
        assert SD15_KEY + ".lora_down.weight" in keys

    # plain diffusers reads the kohya file (its own converter) to the same network
    pipe = PIPES[name].from_pretrained(str(TINY / name))
    pipe.load_lora_weights(str(kohya))
    plain = load_family(str(TINY / name))
    plain.pipe.unet = plain.denoiser = pipe.unet
    torch.testing.assert_close(out(plain, xt, t, cond), policy, rtol=0, atol=1e-5)

    # diffalign's loader reads it directly (generate loras=[file.safetensors] goes through here)
    direct = load_family(str(TINY / name))
    load_lora(direct, kohya)
    torch.testing.assert_close(out(direct, xt, t, cond), policy, rtol=0, atol=1e-5)

    # and back to diffusers format: same outputs, alpha and rank in the adapter config
    back = tmp_path / "back"
    assert main(["export", f"src={kohya}", f"out={back}", "format=diffusers"]) == 0
    fam = load_family(str(TINY / name))
    load_lora(fam, back)
    config = fam.denoiser.peft_config["default"]
    assert (config.r, config.lora_alpha, config.alpha_pattern) == (RANK, ALPHA, {})
    torch.testing.assert_close(out(fam, xt, t, cond), policy, rtol=0, atol=1e-5)
    assert read_metadata(kohya) == {"objective": "dpo"}  # our run metadata travels with the kohya file


def test_per_module_alpha_survives_both_ways(tmp_path):
    trained_lora("sd15", tmp_path / "lora")
    kohya, mixed = tmp_path / "k.safetensors", tmp_path / "mixed.safetensors"
    assert main(["export", f"src={tmp_path / 'lora'}", f"out={kohya}"]) == 0
    with safe_open(str(kohya), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[SD15_KEY + ".alpha"] = torch.tensor(2.0)  # this module: scale 2 / 4; all others 8 / 4
    save_file(tensors, str(mixed))
    fam = load_family(str(TINY / "sd15"))
    load_lora(fam, mixed)
    q = fam.denoiser.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    k = fam.denoiser.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k")
    assert (q.scaling["default"], k.scaling["default"]) == (0.5, 2.0)
    back, again = tmp_path / "back", tmp_path / "again.safetensors"
    assert main(["export", f"src={mixed}", f"out={back}", "format=diffusers"]) == 0
    assert main(["export", f"src={back}", f"out={again}", "format=kohya"]) == 0
    with safe_open(str(again), framework="pt") as f:
        alphas = {key: f.get_tensor(key).item() for key in f.keys() if key.endswith(".alpha")}
    assert alphas.pop(SD15_KEY + ".alpha") == 2.0 and set(alphas.values()) == {float(ALPHA)}


def test_sdxl_kohya_file_with_sgm_block_names_needs_and_uses_the_base_model(tmp_path, capsys):
    """kohya sd-scripts names SDXL modules by the original (SGM) UNet: input_blocks / middle_block / output_blocks.
    With the tiny SDXL UNet (layers_per_block 1): down_blocks.1.attentions.0 = input_blocks.3.1, mid_block
    attentions.0 = middle_block.1, up_blocks.0.attentions.j = output_blocks.j.1."""
    policy, (xt, t, cond) = trained_lora("sdxl", tmp_path / "lora")
    kohya, sgm = tmp_path / "k.safetensors", tmp_path / "sgm.safetensors"
    assert main(["export", f"src={tmp_path / 'lora'}", f"out={kohya}"]) == 0
    names = [("down_blocks_1_attentions_0", "input_blocks_3_1"), ("mid_block_attentions_0", "middle_block_1")]
    names += [(f"up_blocks_0_attentions_{j}", f"output_blocks_{j}_1") for j in range(2)]
    with safe_open(str(kohya), framework="pt") as f:
        tensors = {}
        for key in f.keys():
            new = key
            for diffusers_name, sgm_name in names:
                new = new.replace(diffusers_name, sgm_name)
            tensors[new] = f.get_tensor(key)
    assert all("input_blocks" in k or "output_blocks" in k or "middle_block" in k for k in tensors)
    save_file(tensors, str(sgm))
    back = tmp_path / "back"
    assert main(["export", f"src={sgm}", f"out={back}", "format=diffusers"]) == 2
    assert "need the base model's UNet config" in capsys.readouterr().err
    assert main(["export", f"src={sgm}", f"out={back}", "format=diffusers", f"model={TINY / 'sdxl'}"]) == 0
    for lora in (back, sgm):  # converted file, and the SGM file loaded directly (UNet config from the model)
        fam = load_family(str(TINY / "sdxl"))
        load_lora(fam, lora)
        torch.testing.assert_close(out(fam, xt, t, cond), policy, rtol=0, atol=1e-5)


def test_export_errors_are_one_line(tmp_path, capsys):
    trained_lora("sd15", tmp_path / "lora")
    src, kohya = tmp_path / "lora", tmp_path / "k.safetensors"
    cases = [
        ([f"src={src}", f"out={tmp_path / 'k.pt'}"], "one .safetensors file"),
        ([f"src={src}", f"out={tmp_path / 'x'}", "format=diffusers"], "not a kohya-format LoRA"),
        ([f"src={src}", f"out={kohya}", "format=a1111"], "format='a1111': must be one of kohya, diffusers"),
        ([f"src={tmp_path / 'missing'}", f"out={kohya}"], "no LoRA weights file"),
        ([f"out={kohya}"], "set src="),
    ]
    capsys.readouterr()
    for args, message in cases:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("diffalign: error:") and message in err[-1], (args, err)
    # text-encoder parts are refused by name (diffalign adapts the denoiser only)
    assert main(["export", f"src={src}", f"out={kohya}"]) == 0
    with safe_open(str(kohya), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    tensors.update({te + ".lora_down.weight": torch.zeros(4, 32), te + ".lora_up.weight": torch.zeros(32, 4)})
    save_file(tensors, str(tmp_path / "with_te.safetensors"))
    with pytest.raises(ValueError, match="text-encoder LoRA weights"):
        load_lora(load_family(str(TINY / "sd15")), tmp_path / "with_te.safetensors")


def test_transformer_loras_are_not_exported_to_kohya(tmp_path, capsys):
    fam = load_family(str(TINY / "sd3"))
    add_lora(fam.denoiser, RANK, ALPHA, fam.lora_target_modules)
    save_lora(fam, tmp_path / "lora")
    assert main(["export", f"src={tmp_path / 'lora'}", f"out={tmp_path / 'k.safetensors'}"]) == 2
    assert "kohya export supports UNet LoRAs" in capsys.readouterr().err
