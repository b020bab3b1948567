"""The reward server under load, and an on-line round with a slow reward, side by side in one run.

    python benchmarks/reward_server.py                         # clients 1, 2, 4, 8; on-line rounds
    python benchmarks/reward_server.py --clients 1,8 --seconds 5 --skip-online

(1) Throughput: C concurrent clients (threads of this process, each sending its own request of `--images` toy
images, 64 px PNG, again as soon as its answer is in) for `--seconds` each, to a server in a process of its own:
  old: the server as it was before issue 32 (kept below, not a product feature): Python's http.server, one
       request at a time, each request scored alone;
  new: `diffalign serve-reward` (pipelines/serve_reward.py): uvicorn + starlette, requests that arrive within
       `--max-wait-ms` scored as one call of up to `--max-batch` images.
Both serve the same scorer: toy_aesthetic's scores after a sleep of `--call-ms` + `--image-ms` × images per call,
a batched scorer of known cost (a GPU model, whose call of 32 images costs little more than a call of 1). Rows
give images/s and the p50 / p99 request latency; ratio = new / old images/s at the same client count.

(2) An on-line round (`diffalign online`, tiny SD1.5, 4 chunks of 2 images, `--steps` sampling steps) with a scorer
that sleeps `--online-ms` per image, scored after the round (reward.overlap=false) vs chunk by chunk while the next
chunk is sampled (true), locally and through the new server; median round wall time over rounds 2.. (round 1 pays
the warm-up), the overlapped run first.

The machine is recorded next to the numbers (bench_io.machine: cores, 1-min load); compare ratios from one run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlsplit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_io import machine, write_results  # noqa: E402
from diffalign.pipelines.serve_reward import BadRequest, make_server, parse_request  # noqa: E402

from diffalign.config import ServeRewardConfig  # noqa: E402
from diffalign.rewards import SCORERS, load_scorer  # noqa: E402
from diffalign.rewards.remote import encode_png  # noqa: E402
from diffalign.toy import shapes  # noqa: E402


class Batched:
    """toy_aesthetic after a sleep of call_s + image_s per image: a batched scorer of known cost."""

    def __init__(self, call_s: float, image_s: float):
        self.call_s, self.image_s, self.scorer = call_s, image_s, load_scorer("toy_aesthetic")

    def __call__(self, images, prompts):
        time.sleep(self.call_s + self.image_s * len(images))
        return self.scorer(images, prompts)


# ---- the old server, as pipelines/serve_reward.py was before issue 32 (one request at a time) ----------------------
def old_server(scorer, host: str = "127.0.0.1", port: int = 0, max_images: int = 256, max_bytes: int = 512 << 20):
    class Handler(BaseHTTPRequestHandler):
        def reply(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # noqa: N802 (http.server's naming)
            size = int(self.headers.get("Content-Length") or 0)
            if size > max_bytes:
                self.close_connection = True
                return self.reply(413, {"error": f"request of {size} bytes"})
            try:
                pils, prompts = parse_request(self.rfile.read(size), max_images)
                self.reply(200, {"scores": [float(s) for s in scorer(pils, prompts)]})
            except BadRequest as err:
                self.reply(400, {"error": str(err)})

        def log_message(self, fmt, *args):
            pass

    return HTTPServer((host, port), Handler)


def serve_here(args) -> None:
    """--serve old|new: this process serves the batched scorer on a free loopback port, prints its URL, and serves
    until SIGTERM (the clients live in another process, as trainers do)."""
    scorer = Batched(args.call_ms / 1000, args.image_ms / 1000)
    if args.serve == "old":
        server = old_server(scorer)
        print(f"http://127.0.0.1:{server.server_address[1]}/score", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        server.serve_forever()
    cfg = ServeRewardConfig(
        scorer="toy_aesthetic", port=0, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=256
    )
    server = make_server(scorer, cfg)
    print(server.url, flush=True)
    server.serve_forever()


@contextmanager
def serving(kind: str, args):
    """Server `kind` in a subprocess -> its URL; stopped with SIGTERM on exit."""
    cmd = [sys.executable, __file__, "--serve", kind, "--threads", str(args.threads), "--call-ms", str(args.call_ms),
           "--image-ms", str(args.image_ms), "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"the {kind} server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()


def load_test(url: str, clients: int, seconds: float, images: int) -> dict:
    """`clients` threads send requests of `images` images for `seconds` -> images/s, p50 / p99 latency (ms).

    Each client is a load generator: its request body is encoded once and sent again as soon as its answer is in,
    over a kept-alive connection where the server keeps it (the old server closes each one), so what is measured is
    the server, not the clients' PNG encoding (the `remote` client itself runs in the on-line rows)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    bodies = []
    for k in range(clients):
        pixels, captions = shapes.render_batch(np.random.default_rng(k), images)
        pils = [shapes.to_pil(im) for im in pixels]
        bodies.append(json.dumps({"prompts": captions, "images": [encode_png(im) for im in pils]}).encode())
    latencies, errors = [], []
    start = time.perf_counter()
    stop = start + seconds

    def client(k):
        conn = None
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                conn = conn or http.client.HTTPConnection(host, port, timeout=60)
                conn.request("POST", "/score", body=bodies[k], headers={"Content-Type": "application/json"})
                answer = conn.getresponse()
                scores = json.loads(answer.read()).get("scores")
                if answer.status != 200 or len(scores) != images:
                    raise RuntimeError(f"HTTP {answer.status}")
                if answer.will_close:
                    conn.close()
                    conn = None
            except Exception as err:  # counted, reported
                errors.append(str(err))
                return
            latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    pick = lambda q: 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "requests": len(latencies),
        "images_per_s": len(latencies) * images / wall,
        "p50_ms": pick(0.50) if ordered else None,
        "p99_ms": pick(0.99) if ordered else None,
        "errors": errors[:3],
    }


class Sleepy:
    """toy_aesthetic after `ms_per_image` of sleep per image: the on-line rounds' reward of known latency."""

    def __init__(self, seconds_per_image: float):
        self.seconds_per_image, self.scorer = seconds_per_image, load_scorer("toy_aesthetic")

    @classmethod
    def load(cls, ms_per_image: float = 300.0) -> Sleepy:
        return cls(ms_per_image / 1000)

    def __call__(self, images, prompts):
        time.sleep(self.seconds_per_image * len(images))
        return self.scorer(images, prompts)


def online_rounds(args) -> dict:
    """Round wall time of `diffalign online` on tiny SD1.5, scored after the round vs overlapped."""
    from diffalign.pipelines.online import run

    SCORERS["sleepy_toy"] = "__main__:Sleepy"
    tmp = Path(tempfile.mkdtemp(prefix="reward-server-bench-"))
    (tmp / "prompts.txt").write_text("a photo of a cat\nred dog\nblue bird\n")
    base = ["model.path=assets/tiny/sd15", "lora.rank=4", "lora.alpha=4", f"sampling.prompts={tmp / 'prompts.txt'}",
            "sampling.prompts_per_round=4", "sampling.images_per_prompt=2", "sampling.sample_batch=2",
            f"sampling.steps={args.steps}", "sampling.guidance=2.0", "train.steps_per_round=1", "train.batch_size=2",
            "reward.monitor=[]", f"online.rounds={args.rounds}", "eval.prompts=", "train.tensorboard=false"]  # fmt: skip
    server = make_server(Sleepy(args.online_ms / 1000), ServeRewardConfig(scorer="sleepy_toy", port=0, max_batch=2))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    where = {
        "local": ["reward.scorer=sleepy_toy", f"reward.args={{ms_per_image: {args.online_ms}}}"],
        "remote": ["reward.scorer=remote", f"reward.args={{endpoint: '{server.url}', batch_size: 2}}"],
    }
    rows, rewards = {}, {}
    try:
        for name, extra in where.items():
            for overlap in ("true", "false"):
                out = tmp / f"{name}-{overlap}"
                run(None, [*base, *extra, f"reward.overlap={overlap}", f"train.output_dir={out}"])
                log = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
                rows[f"{name}, {'overlapped' if overlap == 'true' else 'scored after the round'}"] = {
                    "round_s": statistics.median(r["round_seconds"] for r in log[1:]),
                }
                rewards[(name, overlap)] = [r["reward"] for r in log]
    finally:
        server.stop()
        thread.join(10)
    same = all(rewards[(n, "true")] == rewards[(n, "false")] for n in where)
    scoring_s = args.online_ms / 1000 * 8
    return {"rows": rows, "scoring_s_per_round": scoring_s, "same_rewards": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=8.0, help="load per (server, client count)")
    parser.add_argument("--images", type=int, default=4, help="images per request")
    parser.add_argument("--call-ms", type=float, default=50.0, help="scorer cost per call")
    parser.add_argument("--image-ms", type=float, default=1.0, help="scorer cost per image")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=16, help="on-line sampling steps")
    parser.add_argument("--rounds", type=int, default=4, help="on-line rounds per run")
    parser.add_argument("--online-ms", type=float, default=300.0, help="on-line scorer sleep per image")
    parser.add_argument("--skip-online", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", default="")
    parser.add_argument("--serve", choices=["old", "new"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve:
        return serve_here(args)

    out = {"machine": machine(), "settings": vars(args), "load": {}}
    print(f"scorer: {args.call_ms:g} ms per call + {args.image_ms:g} ms per image; {args.images} images per request")
    print(f"{'clients':>7} | {'old img/s':>9} {'p50 ms':>8} {'p99 ms':>8} | {'new img/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} | ratio")  # fmt: skip
    for clients in [int(c) for c in args.clients.split(",")]:
        row = {}
        for kind in ("old", "new"):
            with serving(kind, args) as url:
                row[kind] = load_test(url, clients, args.seconds, args.images)
        row["ratio"] = row["new"]["images_per_s"] / row["old"]["images_per_s"]
        out["load"][str(clients)] = row
        o, n = row["old"], row["new"]
        print(f"{clients:>7} | {o['images_per_s']:9.1f} {o['p50_ms']:8.1f} {o['p99_ms']:8.1f} | "
              f"{n['images_per_s']:9.1f} {n['p50_ms']:8.1f} {n['p99_ms']:8.1f} | {row['ratio']:.2f}x", flush=True)  # fmt: skip
        if o["errors"] or n["errors"]:
            print(f"  errors: old {o['errors']} new {n['errors']}")
    if not args.skip_online:
        out["online"] = online_rounds(args)
        print(f"on-line round, scorer {out['online']['scoring_s_per_round']:.1f} s per round of 8 images:")
        for name, row in out["online"]["rows"].items():
            print(f"  {name:<34} {row['round_s']:6.2f} s")
        print(f"  same rewards overlapped and not: {out['online']['same_rewards']}")
    print(f"machine: {out['machine']['cores']} cores, 1-min load {out['machine']['load_1min']:.2f} at the start")
    write_results(out, args.json, "reward_server.json")


if __name__ == "__main__":
    main()
