"""The benchmark scripts still run end to end at tiny size (they are scripts, not speed tests: no timing asserts).

Each runs as its own process, as a user runs it (about 10 s each, mostly imports).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--threads", "1", *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _bench():
    """benchmarks/toy_alignment.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_alignment", REPO / "benchmarks" / "toy_alignment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_tiny(tmp_path):
    out = tmp_path / "train_step.json"
    _run("train_step.py", "--size", "tiny", "--steps", "2", "--warmup", "1", "--quiet", "--json", str(out))
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert set(rows) == {"a", "b", "c"}
    assert all(len(row["times"]) == 2 and row["median_s"] > 0 for row in rows.values())
    assert set(result["ratios"]) == {"a/b time", "a/b memory", "a/c time"}
    # (b) holds the reference copy and the encoders on top of what (a) holds; (c) holds no optimizer state
    assert rows["b"]["held_bytes"] > rows["a"]["held_bytes"] > rows["c"]["held_bytes"]
    assert result["settings"]["latents"] == [4, 8, 8]


@pytest.mark.parametrize(
    "model,extra_row", [("sd15", "family.generate"), ("sd3", "flow SDE + log-probs")], ids=["sd15", "sd3"]
)
def test_sampling_tiny(tmp_path, model, extra_row):
    """diffalign's sampler next to diffusers' pipeline (SD1.5: DDIM; SD3: the flow ODE, plus a throughput row for the
    SDE sampler with log-probs that on-line methods use): same scheduler, seeds and guidance, the pipeline's images
    up to rounding."""
    out = tmp_path / "sampling.json"
    _run("sampling.py", "--models", model, "--images", "2", "--steps", "2", "--rounds", "1", "--json", str(out))
    rows = json.loads(out.read_text())["models"][model]["rows"]
    assert set(rows) == {"diffusers pipeline", "diffalign sample()", extra_row}
    assert all(row["images_per_s"] > 0 for row in rows.values())
    assert rows["diffalign sample()"]["max_abs_diff_uint8"] <= 1


def test_levers_tiny(tmp_path):
    out = tmp_path / "levers.json"
    _run("levers.py", "--size", "tiny", "--steps", "1", "--warmup", "1", "--json", str(out))
    levers = json.loads(out.read_text())["levers"]
    assert {"default", "bf16 autocast", "grad ckpt", "MaPO (no reference)"} <= set(levers)
    assert all(row["median_s"] > 0 for row in levers.values())


@pytest.mark.slow  # four runs as subprocesses (cache, train x2, read pass): ~20 s quiet, over a minute loaded
def test_scale_tiny(tmp_path):
    out = tmp_path / "scale.json"
    _run("scale.py", "--sizes", "64", "--steps", "2", "--processes", "1", "--repeats", "2", "--json", str(out))
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["pairs"] == 64 and row["captions"] == 4
    assert len(row["build"]["1"]["all_build_s"]) == 2 and row["build"]["1"]["phases"]["0"]["pairs_s"] > 0
    cache = row["cache"]
    # text stored once per caption (4 rows for 64 pairs), the pair shards hold latents only (2 x 4x8x8 fp32 + ids)
    assert cache["text_rows"] == 4 and cache["pair_bytes_per_pair"] < 2 * 4 * 8 * 8 * 4 + 200
    assert row["train"]["cache"]["steps_per_s"] > 0 and row["train"]["raw"]["steps_per_s"] > 0
    assert row["read_pass"]["pairs"] == 64 and row["read_pass"]["peak_rss_mb"] > 0
    assert result["sdxl_pickapic_v2"]["cache_bytes"] < result["sdxl_pickapic_v2"]["format1_bytes"]


@pytest.mark.slow  # two tiny on-line runs on the toy models with a curve point per round (~1 min)
def test_toy_alignment_online_rows_with_curves(tmp_path):
    """benchmarks/toy_alignment.py --curves on a DDPM-toy and a flow-toy on-line row, shrunk: each row has a win
    rate, a fidelity change and a time to 90% (a round or None)."""
    small = ["online.rounds=2", "sampling.prompts_per_round=4", "train.steps_per_round=1", "eval.max_prompts=2",
             "eval.images_per_prompt=1", "eval.steps=4", "guards.max_prompts=2", "guards.steps=2"]  # fmt: skip
    cmd = [sys.executable, str(REPO / "benchmarks" / "toy_alignment.py"), "--objectives", "dragon,dragon_flow",
           "--curves", "--out", str(tmp_path), *small]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["objective"] for r in rows] == ["dragon", "dragon_flow"]
    for r in rows:
        assert 0 <= r["win_rate"] <= 1 and "to_90_round" in r
        assert 0 < r["cpu_seconds"]  # the child's user + system time
        assert r["to_90_round"] is None or 1 <= r["to_90_round"] <= 2
        assert set(r["drift"]) == {name for _, name, _ in _bench().DRIFT_COLUMNS}  # drift columns on every row
    points = [json.loads(x) for x in (tmp_path / "dragon_flow" / "curves.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [0, 1, 2] and points[1]["images"] == 8  # eval.max_prompts 2 x 4 seeds
    assert "first held-out win rate >= 90%" in done.stdout
    assert "bg/255" in done.stdout and "Δpos px" in done.stdout


def test_toy_alignment_table_has_drift_columns():
    """Every row of the table prints the drift columns, under their headers."""
    bench = _bench()
    row = {"objective": "dpo", "steps": 300, "win_rate": 0.9, "ci": [0.8, 0.95], "reward_base": 4.8,
           "reward_aligned": 5.3, "reward_change": 0.5, "fidelity_base": 0.98, "fidelity_aligned": 0.98,
           "fidelity_change_points": 0.0, "train_seconds": 100, "seconds_per_step": 0.3, "peak_rss_gb": 1.0,
           "drift": {name: 0.25 * k for k, (_, name, _) in enumerate(bench.DRIFT_COLUMNS)}}  # fmt: skip
    head, _, line = bench.format_table([row]).splitlines()
    for k, (title, _, _) in enumerate(bench.DRIFT_COLUMNS):
        assert title in head and f"{0.25 * k:+.2f}" in line


def test_toy_alignment_online_rows_load():
    """Every on-line row is its shipped config plus overrides that `diffalign online` accepts (a typo fails here, not
    an hour into the benchmark); the toy_grpo side by side differs only where it says (guard, β)."""
    from diffalign.config import OnlineConfig, load_config

    bench = _bench()
    cfgs = {name: load_config(OnlineConfig, REPO / path, fixed) for name, (path, *fixed) in bench.ONLINE.items()}
    shipped, bare, kl = cfgs["grpo"], cfgs["grpo_noguard"], cfgs["grpo_kl"]
    assert shipped.guards.every == 1 and set(shipped.guards.monitors) == {"background_cast", "centre_drift"}
    assert bare.guards.every == 0 and kl.guards.every == 0
    assert shipped.objective.params["beta"] == bare.objective.params["beta"] == 0 and kl.objective.params["beta"] == 10


@pytest.mark.slow  # the old and the new server as subprocesses, then 4 tiny on-line runs: ~60 s
def test_reward_server_tiny(tmp_path):
    out = tmp_path / "reward_server.json"
    _run("reward_server.py", "--clients", "2", "--seconds", "1", "--rounds", "2", "--steps", "2", "--online-ms", "20",
         "--json", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["load"]) == {"2"}
    for row in result["load"].values():
        for kind in ("old", "new"):
            assert row[kind]["requests"] > 0 and row[kind]["images_per_s"] > 0 and not row[kind]["errors"]
    assert result["online"]["same_rewards"] and len(result["online"]["rows"]) == 4


@pytest.mark.slow  # one tiny-SD3 GRPO round as a subprocess: ~15 s quiet, 45 s loaded
def test_online_peer_diffalign_side(tmp_path):
    """benchmarks/online_peer.py --smoke without a flow_grpo checkout: diffalign's side runs one gated epoch with the
    matched settings (16 chains, LoRA on flow_grpo's 15 modules) and reports its seconds; no ratio without the peer."""
    out = tmp_path / "online_peer.json"
    _run("online_peer.py", "--smoke", "--work", str(tmp_path / "work"), "--json", str(out))
    result = json.loads(out.read_text())
    assert set(result["seconds"]) == {"diffalign"} and "ratio" not in result
    assert len(result["seconds"]["diffalign"]) == 1 and result["seconds"]["diffalign"][0] > 0
    (row,) = [json.loads(x) for x in (tmp_path / "work/diffalign/rounds.jsonl").read_text().splitlines()]
    assert row["pairs_or_samples"] == 16 and row["skipped_steps"] == 0
    from safetensors import safe_open

    (ckpt,) = (tmp_path / "work/diffalign/checkpoints").rglob("trainable.safetensors")
    with safe_open(ckpt, "pt") as f:  # 15 modules x (A, B), rank 32; attn2 (dual attention) left out as flow_grpo
        names = list(f.keys())
        assert len(names) == 30 and all(f.get_slice(n).get_shape()[0 if "lora_A" in n else 1] == 32 for n in names)
    assert not any("attn2" in n for n in names)


@pytest.mark.slow  # two tiny-SD3 NFT rounds as a subprocess: ~15 s quiet
def test_profile_online_nft():
    """benchmarks/profile_online.py profiles round 2 of an NFT run: its header line and the op table print."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "profile_online.py"), "--threads", "1", "--methods", "nft"]
    done = subprocess.run([*cmd, "--rows", "5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "=== nft: one round" in done.stdout and "Self CPU time total" in done.stdout


def test_online_peer_nft_sides_are_valid_configs(tmp_path):
    """benchmarks/online_peer_nft.py (its peer, DiffusionNFT's trainer, is not here): diffalign's side is a valid NFT
    config with the matched keys, and every patch names a passage and its replacement."""
    import importlib.util

    from diffalign.pipelines.online import build_objective, source_of

    from diffalign.config import OnlineConfig, load_config

    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("online_peer_nft", REPO / "benchmarks" / "online_peer_nft.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = load_config(OnlineConfig, None, bench.nft_overrides(tmp_path, tmp_path / "prompts.txt", 3))
    source_of(cfg, "online")  # the source's checks, as the program runs them before loading the model
    assert build_objective(cfg.objective).timesteps == "sampler" and cfg.sampling.guidance == 1.0
    # 48 visits an epoch, as the peer's 16 samples x 3 of their 4 timesteps
    assert cfg.train.steps_per_round * cfg.train.batch_size * cfg.train.grad_accum == 48 == 16 * 3
    assert all(old and new and old != new for _, old, new in bench.PATCHES)
