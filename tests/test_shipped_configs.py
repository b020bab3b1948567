"""Every shipped YAML runs: one optimizer step (`diffalign train`) or one round (`diffalign online`) on its family's
tiny pipeline under assets/tiny (toy configs: the toy model).

What is overridden, and only that: the model folder (the hub checkpoints are not here), sizes (steps, batch,
rounds, prompts, images), the data and prompt files (the shipped paths point at data a user downloads), and the
scorers that need downloaded weights (PickScore, HPSv2, LAION aesthetic: replaced by toy_aesthetic). Everything else
(objective and its hyper-parameters, LoRA rank and targets, dtype, mixed precision, gradient checkpointing, cache,
learning rate, split rule, guidance, ...) runs as shipped. No shipped config sets a GPU-only key (adam_8bit,
xformers); a test below keeps it that way, so the CPU run covers each config whole.
"""

import json
from pathlib import Path

import pytest
import yaml
from diffalign.pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "accelerate" not in p.parts)
TINY = {
    "sd15": "sd15",
    "sdxl": "sdxl",
    "sd3": "sd3",
    "pixart": "pixart",
    "flux": "flux",
    "zimage": "zimage",
    "qwenimage": "qwenimage",
    "flux2": "flux2_klein",
    "wan": "wan",
}  # file-name prefix -> assets/tiny/<name>
TINY_SIZE = {"wan": 16}  # folders whose files give no native size (the wan family's is the real 480 px)
WEIGHTED = {
    "pickscore",
    "hpsv2",
    "aesthetic",
    "clip_score",
    "clip_score_openclip",
    "geneval",
}  # need downloaded weights
# the slow CI step runs these (each about 3-11 s on 2 shared cores: inversion forwards, T5, fp16 on a CPU, SDXL-size
# graphs, on-line sampling); the rest of the set takes about 20 s
SLOW = {
    "pixart_dpo",
    "sd15_d3po",
    "sd3_grpo",
    "sdxl_grpo",
    "sdxl_d3po",
    "sdxl_dragon",
    "sdxl_dro",
    "sdxl_inpo",
    "sdxl_smpo",
    "toy_dro",
    "toy_grpo",
    "toy_hack",  # six rounds at a high lr: the guards' demo
    "sd3_nft",  # 80 s measured on a loaded box: 48 images (groups of 24), 18 accumulation micro-steps
    "toy_nft",  # toy NFT configs: 12 s each on a loaded box
    "toy_flow_nft",
    "toy_flow_awm",  # as toy_flow_nft
    "toy_flow_dgpo",  # on-line sampling and scoring, as toy_flow_nft
    "zimage_grpo",  # 10-15 s each on a loaded box: on-line sampling with CFG, Qwen3 encoding
    "zimage_turbo_grpo",
    "flux2_klein_dpo",  # 21 s on a loaded box: 28-layer Qwen3 at 512 tokens for the cache
    "flux2_klein_grpo",  # 60 s on a loaded box: 2 x 16 images with CFG, the base-vs-LoRA evaluation
    "flux2_klein_distilled_grpo",  # as flux2_klein_grpo, without CFG
    "wan_grpo",  # 18 s: CFG video sampling (5 frames) on a loaded box
}  # top-level stems


def _shipped(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _model(path: Path, raw: dict) -> list[str]:
    prefix = path.stem.split("_")[0]
    if prefix == "toy" or "tiny" in path.parts:
        return []
    size = TINY_SIZE.get(prefix, 0)  # 0: the tiny folder's native size
    out = [f"model.path={REPO / 'assets' / 'tiny' / TINY[prefix]}", f"model.resolution={size}"]
    if raw.get("model", {}).get("vae_path"):
        out.append("model.vae_path=")  # a hub VAE (sdxl-vae-fp16-fix); the tiny pipeline has its own
    return out


def _scorers(key: str, names: list[str], keep_one: bool = False) -> list[str]:
    kept = [n for n in names if n not in WEIGHTED] or (["toy_aesthetic"] if keep_one else [])
    return [f"{key}=[{','.join(kept)}]"] if kept != names else []


def _train_overrides(path: Path, raw: dict, tmp: Path, pairs: Path) -> list[str]:
    data = raw.get("data", {})
    out = [f"data.source={pairs}", f"train.output_dir={tmp / 'run'}", "train.max_steps=1", "train.batch_size=1"]
    if data.get("cache_dir"):
        out.append(f"data.cache_dir={tmp / 'cache'}")
    if data.get("label_scorer") in WEIGHTED:
        out.append("data.label_scorer=toy_aesthetic")
    return out


def _online_overrides(raw: dict, tmp: Path, pairs: Path, prompts: Path) -> list[str]:
    tc, sc, ev = raw.get("train", {}), raw.get("sampling", {}), raw.get("eval", {})
    rw, oc = raw.get("reward", {}), raw.get("online", {})
    out = [f"train.output_dir={tmp / 'run'}", "online.rounds=1", "sampling.prompts_per_round=2", "sampling.steps=2"]
    out += ["sampling.sample_batch=4", "train.steps_per_round=1", "train.batch_size=2", "train.tensorboard=false"]
    if tc.get("trajectory_steps"):
        out.append("train.trajectory_steps=1")
    if tc.get("grad_accum", 1) > 1:
        out.append("train.grad_accum=1")
    if sc.get("sde_window_size"):  # a window of the 2 steps: its first (a sliding one starts there too)
        out += ["sampling.sde_window_size=1", "sampling.sde_window_range=[0,1]"]
    if sc.get("prompts", "toy") != "toy":
        out.append(f"sampling.prompts={prompts}")
    if rw.get("scorer", "toy_aesthetic") in WEIGHTED:
        out += ["reward.scorer=toy_aesthetic", "reward.args={}"]
    out += _scorers("reward.monitor", rw.get("monitor", []))
    if oc.get("experts", "toy") != "toy":
        out.append(f"online.experts={pairs}")
    if "experts" in oc or oc.get("expert_scorer"):
        out.append("online.max_experts=4")
    if oc.get("expert_scorer") in WEIGHTED:
        out.append("online.expert_scorer=toy_aesthetic")
    if rw.get("exemplars"):
        out.append("reward.exemplar_count=8")
    if ev.get("prompts", "toy") not in ("toy", ""):
        out.append(f"eval.prompts={prompts}")
    out += _scorers("eval.scorers", ev.get("scorers", []), keep_one=True)
    if raw.get("guards", {}).get("every"):
        out += ["guards.max_prompts=2", "guards.steps=2"]  # the guard images: 2 prompts x images_per_prompt
        if raw["guards"].get("prompts", "toy") != "toy":
            out.append(f"guards.prompts={prompts}")
    return out + ["eval.max_prompts=2", "eval.images_per_prompt=1", "eval.steps=2"]  # FD needs 2 images


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from data_factory import make_rows, write_parquet

    root = tmp_path_factory.mktemp("shipped")
    prompts = root / "prompts.txt"
    prompts.write_text("a small red circle at the top left\na large blue square at the bottom right\n")
    return write_parquet(root / "pairs.parquet", make_rows(6, seed=5)), prompts


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.parent.name == "configs" and p.stem in SLOW else p for p in CONFIGS],
    ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS],
)
def test_shipped_config_runs(path, inputs, tmp_path, capsys):
    pairs, prompts = inputs
    raw = _shipped(path)
    online = "online" in raw
    command = "online" if online else "train"
    overrides = _model(path, raw)
    if online:
        overrides += _online_overrides(raw, tmp_path, pairs, prompts)
    else:
        overrides += _train_overrides(path, raw, tmp_path, pairs)
    rc = main([command, str(path), *overrides])
    assert rc == 0, capsys.readouterr().err[-3000:]
    run = tmp_path / "run"
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    rows = (run / ("rounds.jsonl" if online else "metrics.jsonl")).read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["round" if online else "step"] == 1
    if raw.get("guards", {}).get("every"):  # the shipped guard ran: the base and the last round's check
        unit = "round" if online else "step"
        assert [json.loads(r)[unit] for r in (run / "guards.jsonl").read_text().splitlines()] == [0, 1]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["objective"]["name"] == raw["objective"]["name"]  # the shipped objective, not a default


def test_no_shipped_config_needs_a_gpu():
    """adam_8bit (bitsandbytes) and xformers exist only on GPU; a shipped config that sets them could not be run
    whole above, so none does (set them on the command line)."""
    for path in CONFIGS:
        train = _shipped(path).get("train", {})
        assert not train.get("adam_8bit") and not train.get("xformers"), path.name


def test_every_config_has_a_tiny_pipeline_or_is_toy():
    for path in CONFIGS:
        prefix = path.stem.split("_")[0]
        assert prefix == "toy" or prefix in TINY, path.name
