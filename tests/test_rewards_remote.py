"""The `remote` scorer and `diffalign serve-reward` on loopback: same scores as the local scorer, dynamic batching
across requests, stalled clients, 8 concurrent clients, the token, a full queue, bad input, shutdown, retries,
several endpoints, timeouts and unreachable endpoints with bounded waits; `score`, `compare` and an on-line toy round
through the CLI. Every server listens on 127.0.0.1 and every loop stops by itself."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from diffalign.pipelines.cli import main
from diffalign.pipelines.serve_reward import make_server

from diffalign.config import ServeRewardConfig
from diffalign.errors import DiffalignError
from diffalign.rewards import load_scorer
from diffalign.rewards.remote import TOKEN_ENV, encode_png
from diffalign.toy import shapes

REPO = Path(__file__).resolve().parents[1]


def _toy_images(n: int, seed: int = 0):
    images, captions = shapes.render_batch(np.random.default_rng(seed), n)
    return [shapes.to_pil(im) for im in images], captions


class Serving:
    """A server for `scorer` on a free loopback port, in a daemon thread; stopped on exit. kwargs: ServeRewardConfig."""

    def __init__(self, scorer, name="toy_aesthetic", token="", **kwargs):
        self.server = make_server(scorer, ServeRewardConfig(scorer=name, port=0, **kwargs), token)
        self.url = self.server.url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.stop()
        self.thread.join(timeout=10)

    def health(self) -> dict:
        return _request(self.url.replace("/score", "/health"), "GET")[1]


class Counting:
    """Wraps a scorer: counts calls and the images it saw; fails the first `fail` calls with a RuntimeError."""

    def __init__(self, scorer, fail: int = 0):
        self.scorer, self.fail, self.calls, self.sizes, self.returned = scorer, fail, 0, [], []
        self.lock = threading.Lock()

    def __call__(self, images, prompts):
        with self.lock:
            self.calls += 1
            if self.calls <= self.fail:
                raise RuntimeError("GPU fell over")
        scores = self.scorer(images, prompts)
        with self.lock:
            self.sizes.append(len(images))
            self.returned.append(scores)
        return scores


class Gate(Counting):
    """A scorer whose calls wait (at most 20 s) until `opened` is set: holds a call in flight on purpose."""

    def __init__(self, scorer):
        super().__init__(scorer)
        self.entered, self.opened = threading.Event(), threading.Event()

    def __call__(self, images, prompts):
        self.entered.set()
        self.opened.wait(20)
        return super().__call__(images, prompts)


def _request(url: str, method: str = "POST", body: bytes = b"", headers: dict | None = None):
    """One raw request -> (status, JSON answer, headers)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        conn.request(
            method, parts.path, body=body or None, headers={"Content-Type": "application/json", **(headers or {})}
        )
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read()), {k.lower(): v for k, v in answer.getheaders()}
    finally:
        conn.close()


def _headers_only(url: str, content_length: int):
    """A POST that declares a body of `content_length` bytes and sends none: the server must answer from the headers
    (sending the body too races the server's early close into a broken pipe on a busy machine)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        conn.putrequest("POST", parts.path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(content_length))
        conn.endheaders()
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read()), {k.lower(): v for k, v in answer.getheaders()}
    finally:
        conn.close()


def _body(images, prompts) -> bytes:
    return json.dumps({"prompts": list(prompts), "images": [encode_png(im) for im in images]}).encode()


def _wait_until(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_remote_scores_equal_local_in_batches():
    """PIL and tensor inputs; PNG is lossless, so the server scores the same uint8 pixels as a local call."""
    local = load_scorer("toy_aesthetic")
    images, captions = _toy_images(5)
    tensor = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 255
    served = Counting(local)
    with Serving(served) as s:
        remote = load_scorer("remote", endpoint=s.url, batch_size=3, timeout=10)
        from_pil, from_tensor = remote(images, captions), remote(tensor, captions)
        assert s.health()["requests"] == 4 and s.health()["images"] == 10  # 3 + 2 images, twice
    assert sum(served.sizes) == 10  # requests that arrive together may share a call
    torch.testing.assert_close(from_pil, local(images, captions))
    torch.testing.assert_close(from_tensor, from_pil)


def test_remote_retries_a_server_error():
    images, captions = _toy_images(5)
    flaky = Counting(load_scorer("toy_aesthetic"), fail=1)
    with Serving(flaky) as s:
        scores = load_scorer("remote", endpoint=s.url, batch_size=2, retries=2, backoff=0.01)(images, captions)
    assert flaky.calls >= 2 and sum(flaky.sizes) == 5  # the first call answered 500, its requests were sent again
    torch.testing.assert_close(scores, load_scorer("toy_aesthetic")(images, captions))


def test_requests_that_arrive_together_are_scored_in_one_call():
    """Four clients send 2 images each within the window: the scorer sees one call of 8, each client its own 2."""
    local = load_scorer("toy_aesthetic")
    served = Counting(local)
    sets = [_toy_images(2, seed=k) for k in range(4)]
    got = {}
    with Serving(served, max_batch=8, max_wait_ms=10_000) as s:

        def client(k):
            got[k] = load_scorer("remote", endpoint=s.url, timeout=30, retries=0)(*sets[k])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        health = s.health()
    assert served.calls == 1 and served.sizes == [8]
    assert health["batches"] == 1 and health["requests"] == 4 and health["images"] == 8
    for k, (images, captions) in enumerate(sets):
        torch.testing.assert_close(got[k], local(images, captions))


def test_eight_concurrent_clients_all_get_correct_scores():
    local = load_scorer("toy_aesthetic")
    sets = [_toy_images(3, seed=10 + k) for k in range(8)]
    got, errors = {}, []
    with Serving(Counting(local), max_batch=16) as s:

        def client(k):
            remote = load_scorer("remote", endpoint=s.url, timeout=30, batch_size=2)
            try:
                got[k] = [remote(*sets[k]) for _ in range(3)]
            except Exception as err:  # reported below, with the thread's name
                errors.append(f"client {k}: {err}")

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        health = s.health()
    assert not errors and len(got) == 8
    for k, (images, captions) in enumerate(sets):
        for scores in got[k]:
            torch.testing.assert_close(scores, local(images, captions))
    assert health["requests"] == 8 * 3 * 2 and health["images"] == 8 * 3 * 3  # 3 images = requests of 2 + 1
    assert health["latency_ms"]["p99"] >= health["latency_ms"]["mean"] > 0


def test_a_stalled_client_does_not_delay_another():
    """One client sends its headers (Content-Length 100) and then nothing, another only half a head: a third
    client's answer comes at once; the first gets 408 after read_timeout, the second is cut off."""
    images, captions = _toy_images(2)
    read_timeout = 3.0
    with Serving(load_scorer("toy_aesthetic"), read_timeout=read_timeout) as s:
        host, port = urlsplit(s.url).hostname, urlsplit(s.url).port
        body_stall = socket.create_connection((host, port), timeout=10)
        head_stall = socket.create_connection((host, port), timeout=10)
        try:
            start = time.monotonic()
            body_stall.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            head_stall.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-")
            scores = load_scorer("remote", endpoint=s.url, timeout=10, retries=0)(images, captions)
            answered = time.monotonic() - start
            stalled = body_stall.recv(4096)
            timed_out = time.monotonic() - start
            assert head_stall.recv(4096) == b""  # closed by the server, no answer
        finally:
            body_stall.close()
            head_stall.close()
    torch.testing.assert_close(scores, load_scorer("toy_aesthetic")(images, captions))
    assert answered < read_timeout, answered
    assert stalled.startswith(b"HTTP/1.1 408") and read_timeout * 0.9 <= timed_out < read_timeout + 5


def test_token_wrong_or_missing_is_401(tmp_path, monkeypatch):
    images, captions = _toy_images(2)
    (tmp_path / "token").write_text("s3cret\n")
    with Serving(load_scorer("toy_aesthetic"), token="s3cret") as s:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
        with pytest.raises(DiffalignError, match=r"HTTP 401: no token .*DIFFALIGN_REWARD_TOKEN"):
            load_scorer("remote", endpoint=s.url, retries=2, backoff=10)(images, captions)  # 4xx: no retry
        monkeypatch.setenv(TOKEN_ENV, "guess")
        with pytest.raises(DiffalignError, match="HTTP 401: wrong token"):
            load_scorer("remote", endpoint=s.url, retries=0)(images, captions)
        status, answer, headers = _request(s.url, body=_body(images, captions), headers={"Authorization": "s3cret"})
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        monkeypatch.setenv(TOKEN_ENV, "s3cret")
        from_env = load_scorer("remote", endpoint=s.url, retries=0)(images, captions)
        monkeypatch.delenv(TOKEN_ENV)
        from_file = load_scorer("remote", endpoint=s.url, retries=0, token_file=str(tmp_path / "token"))(
            images, captions
        )
        assert s.health()["requests"] == 2  # /health needs no token; the 401s were not served
    torch.testing.assert_close(from_env, load_scorer("toy_aesthetic")(images, captions))
    torch.testing.assert_close(from_file, from_env)
    with pytest.raises(DiffalignError, match="not found"):
        load_scorer("remote", endpoint="http://127.0.0.1:9/score", token_file=str(tmp_path / "missing"))


def test_a_full_queue_answers_503_with_retry_after():
    """max_queue=1: one call held in the scorer, one request waiting; the next is refused at once."""
    images, captions = _toy_images(1)
    gate = Gate(load_scorer("toy_aesthetic"))
    answers = []
    with Serving(gate, max_batch=1, max_wait_ms=0, max_queue=1) as s:

        def send():
            answers.append(_request(s.url, body=_body(images, captions))[0])

        first = threading.Thread(target=send)
        first.start()
        assert gate.entered.wait(20)  # the first request is being scored (held)
        second = threading.Thread(target=send)
        second.start()
        _wait_until(lambda: s.health()["queue"]["requests"] == 1)
        status, answer, headers = _request(s.url, body=_body(images, captions))
        gate.opened.set()
        first.join(timeout=20)
        second.join(timeout=20)
    assert status == 503 and "waiting" in answer["error"] and int(headers["retry-after"]) >= 1
    assert answers == [200, 200]


def test_malformed_bodies_get_400_and_the_server_keeps_serving():
    images, captions = _toy_images(2)
    good = _body(images, captions)
    png = encode_png(images[0])
    bad = {
        b"not json": "not JSON",
        b"[1, 2]": "needs lists",
        json.dumps({"prompts": ["a"], "images": [png, png]}).encode(): "2 images and 1 prompts",
        json.dumps({"prompts": [], "images": []}).encode(): "at least 1",
        json.dumps({"prompts": ["a"], "images": ["%%%"]}).encode(): "images[0] is not a base64",
        json.dumps({"prompts": [3], "images": [png]}).encode(): "must be a string",
        json.dumps({"prompts": ["a"] * 3, "images": [png] * 3}).encode(): "at most 2",
    }
    with Serving(load_scorer("toy_aesthetic"), max_images=2, max_request_mb=0.5) as s:
        for body, message in bad.items():
            status, answer, _ = _request(s.url, body=body)
            assert status == 400 and message in answer["error"], (body[:40], answer)
        status, answer, headers = _headers_only(s.url, content_length=1 << 20)
        assert status == 413 and headers["connection"] == "close"
        assert _request(s.url, "GET")[0] == 404 and _request(s.url.replace("/score", "/nowhere"))[0] == 404
        status, answer, _ = _request(s.url, body=good)
        assert status == 200 and answer["scores"] == pytest.approx(
            load_scorer("toy_aesthetic")(images, captions).tolist()
        )
        assert s.health()["requests"] == 1


def test_a_bad_prompt_merged_with_good_requests_fails_alone():
    """toy_fidelity rejects a prompt naming nothing: in a merged call, the others still get their scores."""
    images, _ = _toy_images(3)
    prompts = [["a red circle"], ["nothing to see"], ["a large blue square"]]
    served = Counting(load_scorer("toy_fidelity"))
    results = {}
    with Serving(served, "toy_fidelity", max_batch=3, max_wait_ms=10_000) as s:

        def send(k):
            results[k] = _request(s.url, body=_body(images[k : k + 1], prompts[k]))

        threads = [threading.Thread(target=send, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert [results[k][0] for k in range(3)] == [200, 400, 200]
    assert "names no toy-world attribute" in results[1][1]["error"]
    assert served.sizes == [1, 1]  # the merged call of 3 failed; each request was scored alone


def test_shutdown_finishes_the_request_in_flight_and_refuses_new_ones():
    images, captions = _toy_images(1)
    gate = Gate(load_scorer("toy_aesthetic"))
    answers = []
    serving = Serving(gate).__enter__()
    try:
        held = threading.Thread(target=lambda: answers.append(_request(serving.url, body=_body(images, captions))))
        held.start()
        assert gate.entered.wait(20)
        serving.server.handle_exit(15, None)  # what SIGTERM does in the main thread
        with pytest.raises(DiffalignError, match="shutting down|refused|reset"):
            load_scorer("remote", endpoint=serving.url, retries=0, timeout=5)(images, captions)
        gate.opened.set()
        held.join(timeout=20)
    finally:
        serving.__exit__()
    assert not serving.thread.is_alive()
    status, answer, _ = answers[0]
    assert status == 200 and answer["scores"] == pytest.approx(gate.returned[0].tolist())


def test_remote_round_robin_failover_and_least_loaded():
    images, captions = _toy_images(4)
    local = load_scorer("toy_aesthetic")
    a, b = Counting(local), Counting(local)
    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/score"
    with Serving(a) as sa, Serving(b) as sb:
        both = load_scorer("remote", endpoint=[sa.url, sb.url], batch_size=1, timeout=10)
        torch.testing.assert_close(both(images, captions), local(images, captions))
        assert sum(a.sizes) == 2 and sum(b.sizes) == 2  # 4 requests of 1 image, taking turns
        failover = load_scorer("remote", endpoint=[dead, sb.url], batch_size=1, retries=1, backoff=0.01, timeout=10)
        torch.testing.assert_close(failover(images, captions), local(images, captions))  # each failure retried on b
    gate = Gate(local)
    with Serving(gate) as sa, Serving(b) as sb:
        least = load_scorer("remote", endpoint=[sa.url, sb.url], balance="least_loaded", timeout=20)
        held = threading.Thread(target=least, args=(images[:1], captions[:1]))
        held.start()  # goes to the first endpoint (both idle) and is held there
        assert gate.entered.wait(20)
        before = sum(b.sizes)
        least(images[1:2], captions[1:2])  # the first has one in flight: the second endpoint answers
        assert sum(b.sizes) == before + 1
        gate.opened.set()
        held.join(timeout=20)
    with pytest.raises(DiffalignError, match="balance 'fastest' unknown"):
        load_scorer("remote", endpoint=dead, balance="fastest")


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
    """`python -m diffalign.pipelines.cli serve-reward toy_aesthetic port=0` in a subprocess, its token from the
    environment (never an argument): health, one batch, then SIGTERM stops it cleanly."""
    import os
    import signal

    errors = open(tmp_path / "stderr.log", "w")  # library warnings at import go to stderr, the address to stdout
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffalign.pipelines.cli", "serve-reward", "toy_aesthetic", "port=0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
        env=dict(os.environ, **{TOKEN_ENV: "from-the-environment"}),
    )
    try:
        line = proc.stdout.readline()  # "serving toy_aesthetic on http://127.0.0.1:PORT/score (token required; ...)"
        assert line.startswith("serving toy_aesthetic on http://127.0.0.1:"), (
            line,
            (tmp_path / "stderr.log").read_text(),
        )
        assert "token required" in line and "from-the-environment" not in " ".join(proc.args)
        url = line.split()[3]
        status, health, _ = _request(url.replace("/score", "/health"), "GET")
        assert status == 200 and health["scorer"] == "toy_aesthetic" and health["device"] == "cpu"
        images, captions = _toy_images(3)
        remote = load_scorer("remote", endpoint=url, timeout=20)
        remote.token = "from-the-environment"
        got = remote(images, captions)
        torch.testing.assert_close(got, load_scorer("toy_aesthetic")(images, captions))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert "stopped after 1 requests, 3 images" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
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


class SleepyToy:
    """toy_aesthetic that sleeps `seconds_per_image` per image first: a reward of known latency (a judge thinking)."""

    def __init__(self, seconds_per_image: float):
        self.seconds_per_image, self.scorer = seconds_per_image, load_scorer("toy_aesthetic")

    @classmethod
    def load(cls, seconds_per_image: float = 0.2) -> SleepyToy:
        return cls(seconds_per_image)

    def __call__(self, images, prompts):
        time.sleep(self.seconds_per_image * len(images))
        return self.scorer(images, prompts)


@pytest.mark.slow  # two runs of 4 rounds each, x2: ~80 s; in CI's serial step (it measures time)
@pytest.mark.parametrize("where", ["local", "remote"])
def test_online_overlapped_scoring_hides_the_reward_wait_and_gives_the_same_lora(tmp_path, monkeypatch, where):
    """A scorer that sleeps 0.15 s per image (1.2 s per round of 8, less than the sampling, 1.4 s on a quiet CPU):
    scoring chunks of 2 while the next ones are sampled hides all but the last chunk's sleep from the round's wait
    for its rewards (`reward_wait_seconds`; round times are benchmarks/reward_server.py's) (a thread for a local
    scorer, concurrent requests to the server for a remote one), and the rewards, round log and LoRA equal those of
    scoring after the round."""
    from diffalign.pipelines.online import run
    from safetensors.torch import load_file

    from diffalign.rewards import SCORERS

    monkeypatch.chdir(REPO)
    (tmp_path / "prompts.txt").write_text("a photo of a cat\nred dog\nblue bird\n")
    args = ["model.path=assets/tiny/sd15", "lora.rank=4", "lora.alpha=4", f"sampling.prompts={tmp_path / 'prompts.txt'}",
            "sampling.prompts_per_round=4", "sampling.images_per_prompt=2", "sampling.sample_batch=2",
            "sampling.steps=16", "sampling.guidance=2.0", "train.steps_per_round=1", "train.batch_size=2",
            "reward.monitor=[]", "online.rounds=4", "eval.prompts=", "train.tensorboard=false"]  # fmt: skip
    sleep = 0.15 * 8  # seconds of scoring in a round
    with Serving(SleepyToy(0.15), max_batch=2) as s:
        if where == "local":
            monkeypatch.setitem(SCORERS, "sleepy_toy", f"{__name__}:SleepyToy")
            args += ["reward.scorer=sleepy_toy", "reward.args={seconds_per_image: 0.15}"]
        else:
            args += ["reward.scorer=remote", f"reward.args={{endpoint: '{s.url}', timeout: 30, batch_size: 2}}"]
        rows = {}
        for overlap in ("true", "false"):  # overlapped first: any warm-up cost counts against it
            run(None, [*args, f"reward.overlap={overlap}", f"train.output_dir={tmp_path / overlap}"])
            rows[overlap] = [json.loads(x) for x in (tmp_path / overlap / "rounds.jsonl").read_text().splitlines()]
    for v in rows.values():
        for r in v:
            r.pop("round_seconds")
    # the wait for the rewards after sampling, rounds 2-4 (round 1 pays the warm-up): the scorer's sleep is wall-clock
    # time that does not depend on the machine's load, unlike the round's sampling (which a shared CPU swamps)
    seconds = {k: max([r.pop("reward_wait_seconds") for r in v][1:]) for k, v in rows.items()}
    assert rows["true"] == rows["false"]  # the same rewards, losses, metrics
    a = load_file(str(tmp_path / "false" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "true" / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert seconds["false"] >= sleep  # scored after the round: all of the sleep is waited for
    assert seconds["true"] < seconds["false"] - 0.4 * sleep, seconds  # at least 40% of a round's sleep hidden


def test_set_level_scorers_are_never_split_or_merged():
    """A set-level scorer's score depends on the other images of its call: the server scores each request alone,
    and on-line rounds score the whole round (no ChunkScorer)."""
    from diffalign.config import OnlineConfig
    from diffalign.online.rounds import chunk_scorer
    from diffalign.rewards import scores_each_image

    assert scores_each_image("toy_aesthetic") and scores_each_image("remote")
    assert not scores_each_image("vendi") and not scores_each_image("fd_exemplar")
    toy = {"toy_aesthetic": {"weight": 1.0}}
    assert scores_each_image("multi", {"components": toy})
    assert not scores_each_image("multi", {"components": toy, "normalize": "group"})
    assert not scores_each_image("multi", {"components": {"vendi": {"weight": 1.0}}})

    cfg = OnlineConfig()
    assert chunk_scorer(cfg, load_scorer("toy_aesthetic")) is not None
    cfg.reward.scorer = "vendi"
    assert chunk_scorer(cfg, load_scorer("toy_aesthetic")) is None
    cfg.reward.scorer, cfg.reward.overlap = "toy_aesthetic", False
    assert chunk_scorer(cfg, load_scorer("toy_aesthetic")) is None

    served = Counting(load_scorer("toy_aesthetic"))  # served under a set-level name: no merging
    sets = [_toy_images(2, seed=k) for k in range(2)]
    with Serving(served, "vendi", max_batch=4, max_wait_ms=10_000) as s:
        threads = [threading.Thread(target=_request, args=(s.url, "POST", _body(*sets[k]))) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert s.health()["max_batch"] is None
    assert served.sizes == [2, 2]
