"""The `remote` scorer and `diffalign serve-reward` on loopback: same scores as the local scorer, bad input, retries,
timeouts and unreachable endpoints with bounded waits; `score`, `compare` and an on-line toy round through the CLI."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffalign.pipelines.cli import main
from diffalign.pipelines.serve_reward import make_server

from diffalign.errors import DiffalignError
from diffalign.rewards import load_scorer
from diffalign.toy import shapes

REPO = Path(__file__).resolve().parents[1]


def _toy_images(n: int, seed: int = 0):
    images, captions = shapes.render_batch(np.random.default_rng(seed), n)
    return [shapes.to_pil(im) for im in images], captions


class Serving:
    """A server for `scorer` on a free loopback port, in a daemon thread; stopped on exit."""

    def __init__(self, scorer, name="toy_aesthetic", **kwargs):
        self.server = make_server(scorer, name, "127.0.0.1", 0, **kwargs)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class Counting:
    """Wraps a scorer: counts calls and the images it saw; fails the first `fail` calls with a RuntimeError."""

    def __init__(self, scorer, fail: int = 0):
        self.scorer, self.fail, self.calls, self.sizes, self.returned = scorer, fail, 0, [], []

    def __call__(self, images, prompts):
        self.calls += 1
        if self.calls <= self.fail:
            raise RuntimeError("GPU fell over")
        self.sizes.append(len(images))
        self.returned.append(self.scorer(images, prompts))
        return self.returned[-1]


def test_remote_scores_equal_local_in_batches():
    """PIL and tensor inputs; PNG is lossless, so the server scores the same uint8 pixels as a local call."""
    local = load_scorer("toy_aesthetic")
    images, captions = _toy_images(5)
    tensor = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 255
    served = Counting(local)
    with Serving(served) as s:
        remote = load_scorer("remote", endpoint=s.url, batch_size=3, timeout=10)
        from_pil, from_tensor = remote(images, captions), remote(tensor, captions)
    assert served.sizes == [3, 2, 3, 2]
    torch.testing.assert_close(from_pil, local(images, captions))
    torch.testing.assert_close(from_tensor, from_pil)


def test_remote_batches_requests_and_retries_a_server_error():
    images, captions = _toy_images(5)
    flaky = Counting(load_scorer("toy_aesthetic"), fail=1)
    with Serving(flaky) as s:
        scores = load_scorer("remote", endpoint=s.url, batch_size=2, retries=2, backoff=0.01)(images, captions)
    assert flaky.calls == 4 and flaky.sizes == [2, 2, 1]  # 500 once, retried, then 2 + 2 + 1
    torch.testing.assert_close(scores, torch.cat(flaky.returned))


def test_remote_bad_input_is_one_line_naming_the_endpoint():
    images, _ = _toy_images(2)
    with Serving(load_scorer("toy_fidelity"), "toy_fidelity", max_images=1) as s:
        remote = load_scorer("remote", endpoint=s.url, batch_size=2, retries=3, backoff=10)  # 4xx: no retry, no wait
        start = time.monotonic()
        with pytest.raises(DiffalignError) as err:
            remote(images, ["a red circle", "nothing to see"])
        assert "at most 1" in str(err.value)
        remote.batch_size = 1
        with pytest.raises(DiffalignError, match="HTTP 400: .*names no toy-world attribute") as err:
            remote(images[:1], ["nothing to see"])
        assert time.monotonic() - start < 5
    assert s.url in str(err.value) and "\n" not in str(err.value)


def test_remote_unreachable_and_silent_endpoints_fail_in_bounded_time():
    images, captions = _toy_images(1)
    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(DiffalignError, match=rf"remote reward {url}: .*\(after 2 tries\)"):
        load_scorer("remote", endpoint=url, retries=1, backoff=0.01, timeout=2)(images, captions)
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/score"
        start = time.monotonic()
        with pytest.raises(DiffalignError, match=rf"{url}: .*timed out.*after 2 tries"):
            load_scorer("remote", endpoint=url, retries=1, backoff=0.01, timeout=0.3)(images, captions)
        assert time.monotonic() - start < 5
    with pytest.raises(DiffalignError, match="must start with http"):
        load_scorer("remote", endpoint="localhost:8765")


def test_serve_reward_cli_rejects_a_bad_scorer_before_serving():
    assert main(["serve-reward", "toy_aestetic"]) == 2  # one line with a suggestion
    assert main(["serve-reward", "toy_aesthetic", "prot=1"]) == 2  # config key typo


@pytest.mark.slow  # ~15 s on 2 busy cores, mostly the subprocess importing torch
def test_serve_reward_cli_process(tmp_path):
    """`python -m diffalign.pipelines.cli serve-reward toy_aesthetic port=0` in a subprocess: health, one batch, then stopped."""
    import urllib.request

    errors = open(tmp_path / "stderr.log", "w")  # library warnings at import go to stderr, the address to stdout
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffalign.pipelines.cli", "serve-reward", "toy_aesthetic", "port=0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # "serving toy_aesthetic on http://127.0.0.1:PORT/score ..."
        assert line.startswith("serving toy_aesthetic on http://127.0.0.1:"), (
            line,
            (tmp_path / "stderr.log").read_text(),
        )
        url = line.split()[3]
        health = json.loads(urllib.request.urlopen(url.replace("/score", "/health"), timeout=10).read())
        assert health == {"scorer": "toy_aesthetic"}
        images, captions = _toy_images(3)
        got = load_scorer("remote", endpoint=url, timeout=20)(images, captions)
        torch.testing.assert_close(got, load_scorer("toy_aesthetic")(images, captions))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
        errors.close()


def _manifest_folder(folder: Path, images, captions) -> Path:
    folder.mkdir()
    rows = []
    for i, (im, c) in enumerate(zip(images, captions)):
        im.save(folder / f"{i:05d}.png")
        rows.append({"file": f"{i:05d}.png", "prompt": c, "seed": i})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_score_and_compare_cli_with_the_remote_scorer(tmp_path):
    images, captions = _toy_images(4, seed=1)
    base = _manifest_folder(tmp_path / "base", images, captions)
    aligned = _manifest_folder(tmp_path / "aligned", _toy_images(4, seed=2)[0], captions)
    with Serving(load_scorer("toy_aesthetic")) as s:
        args = f"scorer_args={{remote: {{endpoint: '{s.url}', batch_size: 3}}}}"
        out = tmp_path / "score"
        assert main(["score", f"images={base}", "scorers=[toy_aesthetic,remote]", args, f"output_dir={out}"]) == 0
        rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
        assert [r["remote"] for r in rows] == pytest.approx([r["toy_aesthetic"] for r in rows], abs=1e-6)
        cmp = tmp_path / "cmp"
        assert main(["compare", f"base={base}", f"aligned={aligned}", "scorers=[remote,toy_aesthetic]", args,
                     f"output_dir={cmp}"]) == 0  # fmt: skip
    report = json.loads((cmp / "report.json").read_text())["scorers"]
    assert report["remote"]["mean_delta"] == pytest.approx(report["toy_aesthetic"]["mean_delta"], abs=1e-6)
    assert report["remote"]["win_rate"] == report["toy_aesthetic"]["win_rate"]


def test_online_toy_round_through_the_reward_server(tmp_path, monkeypatch):
    """`diffalign online` with reward.scorer=remote: the round's rewards are the server's scores."""
    monkeypatch.chdir(REPO)
    (tmp_path / "prompts.txt").write_text("a small red circle at the top left\na large blue square at the center\n")
    served = Counting(load_scorer("toy_aesthetic"))
    with Serving(served) as s:
        code = main(["online", "model.path=assets/tiny/sd15", "lora.rank=4", "lora.alpha=4",
                     f"sampling.prompts={tmp_path / 'prompts.txt'}", "sampling.prompts_per_round=2",
                     "sampling.images_per_prompt=2", "sampling.steps=2", "sampling.guidance=2.0", "train.steps_per_round=1",
                     "train.batch_size=2", "reward.monitor=[]", "online.rounds=1", "reward.scorer=remote",
                     f"reward.args={{endpoint: '{s.url}', timeout: 30}}", "train.tensorboard=false",
                     f"train.output_dir={tmp_path / 'run'}"])  # fmt: skip
    assert code == 0 and served.calls >= 1 and sum(served.sizes[:1]) == 4  # the round's 2 x 2 images
    row = json.loads((tmp_path / "run" / "rounds.jsonl").read_text().splitlines()[0])
    assert row["reward"] == pytest.approx(float(served.returned[0].mean()), abs=1e-5)
