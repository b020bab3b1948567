"""A scorer that runs elsewhere: images and prompts are POSTed to HTTP endpoints, scores come back.

Lets a heavy reward (a VLM judge, GenEval's detector, HPSv3) live on other GPUs or machines, shared by many
trainers, as Flow-GRPO's and VeRL-Omni's reward servers do. `diffalign serve-reward SCORER`
(pipelines/serve_reward.py) is the matching server; any server that speaks the same JSON works:

    POST <endpoint>   {"prompts": [str] * n, "images": [base64 PNG] * n}   (Authorization: Bearer TOKEN, if set)
    200               {"scores": [float] * n}
    4xx / 5xx         {"error": "one line"}   (503 may carry Retry-After: seconds)

Images travel as lossless PNG of the uint8-rounded pixels (a tensor in [0, 1] is rounded as when saved to disk).
A call is cut into requests of at most `batch_size` images, sent at once over a pool of kept-alive connections
(`connections` per endpoint) to one or several endpoints, picked round-robin or by the fewest requests this client
has in flight there (`balance`). A connection failure, a timeout or a 5xx answer is retried `retries` times on the
next endpoint, after 2^k · `backoff` seconds (or the server's Retry-After); a 4xx answer (bad input, a wrong token)
is not retried. Any failure raises one line that names the endpoint. The token is read from the file `token_file`
or the environment variable DIFFALIGN_REWARD_TOKEN, never from the config, so it lands in no config.yaml. Not
differentiable. Safe to call from several threads at once (diffalign.rewards.CONCURRENT).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import torch
from PIL import Image

from diffalign.errors import DiffalignError
from diffalign.rewards.geneval import to_pil
from diffalign.rewards.preprocess import Images

TOKEN_ENV = "DIFFALIGN_REWARD_TOKEN"
BALANCE = ("round_robin", "least_loaded")
# a pooled connection the server closed while idle fails on its next use before any answer: resent once, fresh
STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


def encode_png(image: Image.Image) -> str:
    """PIL image -> base64 text of its PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> Image.Image:
    """base64 PNG (or any PIL-readable format) -> RGB PIL image."""
    return Image.open(io.BytesIO(base64.b64decode(text, validate=True))).convert("RGB")


def read_token(token_file: str = "") -> str:
    """The shared token: the first line of `token_file`, else $DIFFALIGN_REWARD_TOKEN, else "" (none)."""
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise DiffalignError(f"token_file {path} not found")
        token = path.read_text().strip()
        if not token:
            raise DiffalignError(f"token_file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip()


class Failed(Exception):
    """One try that failed: `retry` says whether another try may succeed, `wait` the server's Retry-After."""

    def __init__(self, reason: str, retry: bool, wait: float | None = None):
        super().__init__(reason)
        self.reason, self.retry, self.wait = reason, retry, wait


class Endpoint:
    """One server URL: a pool of idle kept-alive connections and the count of requests in flight to it."""

    def __init__(self, url: str, timeout: float):
        parts = urlsplit(url)
        self.url, self.timeout, self.https = url, timeout, parts.scheme == "https"
        self.host, self.port = parts.hostname or "", parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.idle: list[http.client.HTTPConnection] = []
        self.in_flight = 0

    def connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=self.timeout)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


def _error_line(body: bytes, reason: str) -> str:
    try:
        return " ".join(str(json.loads(body)["error"]).split())
    except Exception:  # a non-JSON error page: the status line is all we can say
        return reason or "no message"


@dataclass
class RemoteScore:
    endpoints: list[str]
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 1.0
    batch_size: int = 64
    balance: str = "round_robin"
    connections: int = 4
    token: str = field(default="", repr=False)

    @classmethod
    def load(
        cls,
        endpoint: str | list[str],
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        batch_size: int = 64,
        balance: str = "round_robin",
        connections: int = 4,
        token_file: str = "",
    ) -> RemoteScore:
        """`endpoint`: the server's URL (http://host:port/score) or a list of them; `timeout`: seconds to connect and
        between two pieces of an answer; `retries`: extra tries after a failed one; `backoff`: the first wait,
        doubled each retry; `batch_size`: images per request; `balance`: round_robin | least_loaded;
        `connections`: requests in flight at once per endpoint; `token_file`: a file holding the server's token
        (default: $DIFFALIGN_REWARD_TOKEN)."""
        urls = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        if not urls:
            raise DiffalignError("remote reward: endpoint needs at least one URL")
        for url in urls:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise DiffalignError(f"remote reward: endpoint '{url}' must start with http:// or https://")
        if retries < 0 or timeout <= 0 or batch_size < 1 or connections < 1:
            raise DiffalignError(
                f"remote reward {urls[0]}: need retries >= 0, timeout > 0, batch_size >= 1, connections >= 1"
            )
        if balance not in BALANCE:
            raise DiffalignError(f"remote reward: balance '{balance}' unknown ({', '.join(BALANCE)})")
        return cls(urls, timeout, retries, backoff, batch_size, balance, connections, read_token(token_file))

    def __post_init__(self):
        self._pool = [Endpoint(url, self.timeout) for url in self.endpoints]
        self._lock = threading.Lock()
        self._turn = 0
        self._senders = ThreadPoolExecutor(self.connections * len(self._pool), thread_name_prefix="remote-reward")
        self._slots = threading.BoundedSemaphore(self.connections * len(self._pool))

    # ---- one request ------------------------------------------------------------------------------------------
    def _pick(self, avoid: Endpoint | None) -> Endpoint:
        """The next endpoint by `balance`, not `avoid` (the one that just failed) when there is another."""
        with self._lock:
            n = len(self._pool)
            order = [self._pool[(self._turn + k) % n] for k in range(n)]
            self._turn = (self._turn + 1) % n
            if avoid is not None and n > 1:
                order.remove(avoid)
            chosen = min(order, key=lambda e: e.in_flight) if self.balance == "least_loaded" else order[0]
            chosen.in_flight += 1
            return chosen

    def _exchange(self, where: Endpoint, body: bytes, headers: dict) -> tuple[int, bytes, str, str | None]:
        """Send one request on a pooled connection (a stale one is replaced once) -> status, body, reason, Retry-After."""
        with self._lock:
            conn, fresh = (where.idle.pop(), False) if where.idle else (None, True)
        conn = conn or where.connect()
        while True:
            try:
                try:
                    conn.request("POST", where.path, body=body, headers=headers)
                except (BrokenPipeError, ConnectionResetError):
                    if not fresh:
                        raise
                    # the server answered early (401, 413, 503) and closed while the body was sent: read the answer
                response = conn.getresponse()
                data = response.read()
            except STALE:
                conn.close()
                if fresh:
                    raise
                conn, fresh = where.connect(), True
                continue
            except BaseException:
                conn.close()
                raise
            if response.will_close:
                conn.close()
            else:
                with self._lock:
                    where.idle.append(conn)
            return response.status, data, response.reason, response.getheader("Retry-After")

    def _try(self, where: Endpoint, body: bytes, n: int) -> list[float]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            status, data, reason, retry_after = self._exchange(where, body, headers)
        except (OSError, http.client.HTTPException) as err:  # refused, timed out, cut
            raise Failed(str(err) or type(err).__name__, retry=True) from None
        if status != 200:
            line = f"HTTP {status}: {_error_line(data, reason)}"
            if status == 401:
                line += f" (the server wants a token: ${TOKEN_ENV} or token_file)"
            wait = float(retry_after) if retry_after and retry_after.isdigit() else None
            raise Failed(line, retry=status >= 500, wait=wait)
        try:
            scores = json.loads(data)["scores"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise Failed("answer is not JSON with 'scores'", retry=False) from None
        if not isinstance(scores, list) or len(scores) != n:
            got = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise Failed(f"{got} scores for {n} images", retry=False)
        return [float(s) for s in scores]

    def post(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """One request (with retries, each on the next endpoint) -> len(images) scores."""
        body = json.dumps({"prompts": prompts, "images": [encode_png(im) for im in images]}).encode()
        where = None
        for attempt in range(self.retries + 1):
            where = self._pick(avoid=where)
            try:
                return self._try(where, body, len(images))
            except Failed as err:
                failed = err
            finally:
                with self._lock:
                    where.in_flight -= 1
            if not failed.retry:
                raise DiffalignError(f"remote reward {where.url}: {failed.reason}")
            if attempt == self.retries:
                raise DiffalignError(f"remote reward {where.url}: {failed.reason} (after {attempt + 1} tries)")
            time.sleep(failed.wait if failed.wait is not None else self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _post_in_slot(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        with self._slots:  # several calls at once (threads) share the pool's `connections` per endpoint
            return self.post(images, prompts)

    def __call__(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """N images, N prompts -> (N,) scores from the servers (requests of `batch_size` images, sent at once)."""
        pils = to_pil(images)
        if len(pils) != len(prompts):
            raise ValueError(f"{len(pils)} images but {len(prompts)} prompts")
        starts = range(0, len(pils), self.batch_size)
        if len(starts) == 1:
            return torch.tensor(self._post_in_slot(pils, list(prompts)), dtype=torch.float32)
        futures = [
            self._senders.submit(
                self._post_in_slot, pils[i : i + self.batch_size], list(prompts[i : i + self.batch_size])
            )
            for i in starts
        ]
        wait(futures)  # every request ends (answered or failed) before the first failure is raised
        scores = []
        for future in futures:  # in order
            scores += future.result()
        return torch.tensor(scores, dtype=torch.float32)

    def close(self) -> None:
        """Close the kept-alive connections (new ones open on the next call)."""
        with self._lock:
            for where in self._pool:
                where.close()
