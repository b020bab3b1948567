"""`diffalign serve-reward SCORER [scorer_args={...}] [host=127.0.0.1] [port=8765] [max_batch=64] ...`: serve one
scorer over HTTP to many trainers at once.

The server side of the `remote` scorer (diffalign/rewards/remote.py documents the JSON protocol): load any SCORERS
entry once, then answer `POST /score` with its scores and `GET /health` with its load. Built on uvicorn + starlette
(asyncio): every connection is a coroutine, so a slow or stalled client holds only its own connection; the scorer
runs in one worker thread, one batch at a time (it holds one model).

- Dynamic batching: requests that arrive within `max_wait_ms` of the first waiting one are scored as one call of up
  to `max_batch` images, and each gets its own scores back (set-level scorers, diffalign.rewards.SET_LEVEL, score
  each request alone). If the merged call rejects an input (ValueError), each request is scored alone, so only the
  bad one answers 400.
- Limits: a request head must arrive within `read_timeout` seconds of connecting (or of the previous answer on a
  kept-alive connection), and a body may pause at most `read_timeout` seconds (408); at most `max_queue` requests
  wait (more answer 503 with Retry-After); `max_request_mb` per body (413) and `max_images` per request (400). Bad
  input (not JSON, lengths that differ, an image that does not decode, a prompt the scorer rejects) answers 400
  with a one-line error and the server keeps serving; a scorer crash answers 500.
- Token: with `token_file` (or $DIFFALIGN_REWARD_TOKEN) set, `POST /score` needs `Authorization: Bearer TOKEN`
  (else 401); the token is never a command-line argument. `GET /health` stays open (it tells only load).
- `GET /health`: scorer, device, queue (requests, images), images being scored, requests / images / batches served,
  mean and p99 latency (ms, the last 10,000 requests), and whether it is shutting down.
- SIGTERM or Ctrl-C: stop accepting, answer 503 to anything new, finish the requests in flight (at most
  `shutdown_timeout` seconds), then exit.

    # on the GPU machine (the token from a file, or DIFFALIGN_REWARD_TOKEN)
    diffalign serve-reward vlm_judge scorer_args="{device: cuda}" host=0.0.0.0 port=8765 token_file=~/.reward-token
    # in the training runs
    diffalign online ... reward.scorer=remote reward.args="{endpoint: [http://gpu1:8765/score, http://gpu2:8765/score]}"

SCORER may also be a YAML file with the keys below; the CLI turns a bare NAME into `scorer=NAME` (its COMMANDS).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
import uvicorn
from diffalign.pipelines.score import load_scorers
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from diffalign.config import ServeRewardConfig, load_config
from diffalign.rewards import scores_each_image
from diffalign.rewards.remote import decode_png, read_token

CLOSE = {"Connection": "close"}  # on answers sent before the body was read: the rest must not parse as a request


class BadRequest(ValueError):
    """A request the server answers with 400."""


class QueueFull(Exception):
    """`max_queue` requests are already waiting: 503."""


def one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def parse_request(body: bytes, max_images: int) -> tuple[list, list[str]]:
    """JSON body {"prompts", "images": base64 PNG} -> (PIL images, prompts); BadRequest names what is wrong."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("body is not JSON") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("prompts"), list)
        or not isinstance(data.get("images"), list)
    ):
        raise BadRequest("body needs lists 'prompts' and 'images'")
    prompts, images = data["prompts"], data["images"]
    if len(prompts) != len(images) or not images:
        raise BadRequest(f"{len(images)} images and {len(prompts)} prompts (need the same number, at least 1)")
    if len(images) > max_images:
        raise BadRequest(f"{len(images)} images in one request; the server takes at most {max_images}")
    if not all(isinstance(p, str) for p in prompts):
        raise BadRequest("every prompt must be a string")
    pils = []
    for i, text in enumerate(images):
        try:
            pils.append(decode_png(text))
        except Exception:  # binascii.Error, PIL.UnidentifiedImageError, TypeError, ...
            raise BadRequest(f"images[{i}] is not a base64-encoded image") from None
    return pils, prompts


@dataclass
class Job:
    pils: list
    prompts: list[str]
    arrived: float  # loop time
    future: asyncio.Future


class Batcher:
    """The one task that calls the scorer: it waits for the first request, lets others join it for `max_wait`
    seconds (or until `max_batch` images wait), scores them as one call in the scorer thread and splits the scores."""

    def __init__(self, scorer, max_batch: int, max_wait: float, max_queue: int, merge: bool):
        self.scorer, self.max_batch, self.max_wait, self.max_queue, self.merge = (
            scorer, max_batch, max_wait, max_queue, merge,
        )  # fmt: skip
        self.waiting: deque[Job] = deque()
        self.wake = asyncio.Event()
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="scorer")
        self.scoring = 0  # images in the call now running
        self.batches = 0
        self.batch_seconds: deque[float] = deque(maxlen=100)

    def waiting_images(self) -> int:
        return sum(len(job.pils) for job in self.waiting)

    def full(self) -> bool:
        return len(self.waiting) >= self.max_queue

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved: the calls ahead times the mean call time, at least 1."""
        per_call = sum(self.batch_seconds) / len(self.batch_seconds) if self.batch_seconds else 1.0
        return max(1, math.ceil((self.waiting_images() / self.max_batch + 1) * per_call))

    async def score(self, pils: list, prompts: list[str]) -> list[float]:
        if self.full():
            raise QueueFull
        loop = asyncio.get_running_loop()
        job = Job(pils, prompts, loop.time(), loop.create_future())
        self.waiting.append(job)
        self.wake.set()
        return await job.future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.waiting:
                self.wake.clear()
                await self.wake.wait()
                continue
            deadline = self.waiting[0].arrived + self.max_wait
            while self.merge and self.waiting_images() < self.max_batch and deadline > loop.time():
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            batch = [self.waiting.popleft()]
            size = len(batch[0].pils)
            while self.merge and self.waiting and size + len(self.waiting[0].pils) <= self.max_batch:
                size += len(self.waiting[0].pils)
                batch.append(self.waiting.popleft())
            await self.score_batch(batch)

    def call(self, pils: list, prompts: list[str]) -> list[float]:
        """In the scorer thread: one scorer call -> one float per image."""
        with torch.no_grad():  # thread-local: set here, not in the event loop's thread
            scores = self.scorer(pils, prompts)
        if len(scores) != len(pils):
            raise RuntimeError(f"the scorer gave {len(scores)} scores for {len(pils)} images")
        return [float(s) for s in scores]

    async def score_batch(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        pils = [im for job in batch for im in job.pils]
        prompts = [p for job in batch for p in job.prompts]
        self.scoring, start = len(pils), time.perf_counter()
        try:
            scores = await loop.run_in_executor(self.thread, self.call, pils, prompts)
        except ValueError as err:  # the scorer's own bad-input error (a prompt it cannot parse, ...)
            scores, failure = None, BadRequest(one_line(err))
        except Exception as err:  # a scorer crash: 500 for the whole call
            scores, failure = None, err
        finally:
            self.scoring = 0
        if scores is None:
            if isinstance(failure, BadRequest) and len(batch) > 1:  # find the bad request: each one alone
                for job in batch:
                    await self.score_batch([job])
                return
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(failure)
            return
        self.batches += 1
        self.batch_seconds.append(time.perf_counter() - start)
        i = 0
        for job in batch:  # (sum n_j,) -> each request's n_j scores
            if not job.future.done():  # a client that went away leaves a cancelled future
                job.future.set_result(scores[i : i + len(job.pils)])
            i += len(job.pils)


class Stats:
    """Requests and images answered 200, and their latencies (body received -> scores sent)."""

    def __init__(self):
        self.requests, self.images = 0, 0
        self.latencies: deque[float] = deque(maxlen=10_000)

    def served(self, images: int, seconds: float) -> None:
        self.requests += 1
        self.images += images
        self.latencies.append(seconds)

    def latency_ms(self) -> dict[str, float | None]:
        if not self.latencies:
            return {"mean": None, "p99": None}
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
        return {"mean": round(1000 * sum(ordered) / len(ordered), 3), "p99": round(1000 * p99, 3)}


class TooLarge(Exception):
    pass


async def read_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    """The request body, at most `max_bytes` (TooLarge), each piece within `timeout` seconds (asyncio.TimeoutError)."""
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > max_bytes:
        raise TooLarge(f"request of {declared} bytes; the server takes at most {max_bytes}")
    pieces, size = [], 0
    stream = request.stream()
    while True:
        try:
            piece = await asyncio.wait_for(stream.__anext__(), timeout)
        except StopAsyncIteration:
            return b"".join(pieces)
        size += len(piece)
        if size > max_bytes:
            raise TooLarge(f"request over {max_bytes} bytes; the server takes at most {max_bytes}")
        pieces.append(piece)


def reply(code: int, payload: dict, headers: dict | None = None) -> Response:
    """JSON answer (json.dumps as the client reads it: a NaN score stays NaN)."""
    return Response(json.dumps(payload), code, headers, media_type="application/json")


def build_app(scorer, cfg: ServeRewardConfig, token: str) -> Starlette:
    """The ASGI app: POST /score (batched), GET /health; `token` "" = no token needed."""
    merge = scores_each_image(cfg.scorer, cfg.scorer_args)
    max_bytes = int(cfg.max_request_mb * 2**20)
    expected = f"Bearer {token}".encode()
    stats = Stats()
    state = {"closing": False, "batcher": None}

    @asynccontextmanager
    async def lifespan(app):
        batcher = state["batcher"] = Batcher(scorer, cfg.max_batch, cfg.max_wait_ms / 1000, cfg.max_queue, merge)
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.thread.shutdown(wait=False)
        print(f"serve-reward {cfg.scorer}: stopped after {stats.requests} requests, {stats.images} images", flush=True)

    async def score(request: Request) -> Response:
        batcher = state["batcher"]
        if state["closing"]:
            return reply(503, {"error": "the server is shutting down"}, {"Retry-After": "1", **CLOSE})
        if token and not hmac.compare_digest(request.headers.get("authorization", "").encode("latin-1"), expected):
            why = "wrong token" if "authorization" in request.headers else "no token"
            return reply(401, {"error": f"{why} (Authorization: Bearer)"}, {"WWW-Authenticate": "Bearer", **CLOSE})
        if batcher.full():
            busy = f"{len(batcher.waiting)} requests waiting; try again later"
            return reply(503, {"error": busy}, {"Retry-After": str(batcher.retry_after()), **CLOSE})
        start = time.perf_counter()
        try:
            body = await read_body(request, max_bytes, cfg.read_timeout)
        except TooLarge as err:
            return reply(413, {"error": str(err)}, CLOSE)
        except asyncio.TimeoutError:
            return reply(408, {"error": f"no data for {cfg.read_timeout:g} s while reading the body"}, CLOSE)
        try:
            pils, prompts = await run_in_threadpool(parse_request, body, cfg.max_images)
            scores = await batcher.score(pils, prompts)
        except BadRequest as err:
            return reply(400, {"error": str(err)})
        except QueueFull:
            busy = f"{len(batcher.waiting)} requests waiting; try again later"
            return reply(503, {"error": busy}, {"Retry-After": str(batcher.retry_after())})
        except Exception as err:  # a scorer crash: report it, keep serving
            return reply(500, {"error": f"{type(err).__name__}: {one_line(err)}"})
        stats.served(len(pils), time.perf_counter() - start)
        return reply(200, {"scores": scores})

    async def health(request: Request) -> Response:
        batcher = state["batcher"]
        return reply(200, {
            "scorer": cfg.scorer,
            "device": str(cfg.scorer_args.get("device", "cpu")),
            "queue": {"requests": len(batcher.waiting), "images": batcher.waiting_images()},
            "scoring": batcher.scoring,
            "requests": stats.requests,
            "images": stats.images,
            "batches": batcher.batches,
            "latency_ms": stats.latency_ms(),
            "max_batch": cfg.max_batch if merge else None,
            "closing": state["closing"],
        })  # fmt: skip

    async def unknown(request: Request, exc: Exception) -> Response:
        return reply(
            404, {"error": f"unknown path {request.method} {request.url.path}; use POST /score or GET /health"}
        )

    app = Starlette(
        routes=[Route("/score", score, methods=["POST"]), Route("/health", health, methods=["GET"])],
        exception_handlers={404: unknown, 405: unknown},
        lifespan=lifespan,
    )
    app.state.serving = state
    return app


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline on every request head: a connection that has not sent a whole head
    within `timeout_keep_alive` seconds (set to read_timeout) of connecting, or of its last answer, is closed.
    uvicorn's own keep-alive timer stops at the first byte, so a byte a minute would hold a connection for ever."""

    head_timer: asyncio.TimerHandle | None = None
    head_cycle = None  # the request cycle the deadline waits to see replaced

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and those accepted from
        # socket.create_server's have proto 0: without it, Nagle holds the answer's body behind its head until the
        # client's delayed ACK (40 ms a request on loopback)
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._check()

    def on_response_complete(self) -> None:
        self._arm()
        super().on_response_complete()  # may start a pipelined request at once
        self._check()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self.head_cycle = self.cycle
        self.head_timer = self.loop.call_later(self.timeout_keep_alive, self._expire)

    def _disarm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _check(self) -> None:
        if self.cycle is not self.head_cycle:  # a new request's head is complete: the app reads the body
            self._disarm()

    def _expire(self) -> None:
        self.head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class RewardServer(uvicorn.Server):
    """uvicorn's server on a socket bound (and listening) at construction, so the port is known before it serves;
    SIGTERM / Ctrl-C marks the app closing first (new requests answer 503) and uvicorn drains the rest."""

    def __init__(self, app: Starlette, cfg: ServeRewardConfig):
        super().__init__(
            uvicorn.Config(
                app, http=HeadDeadline, ws="none", lifespan="on", log_level="warning", access_log=False,
                timeout_keep_alive=cfg.read_timeout, timeout_graceful_shutdown=cfg.shutdown_timeout,
            )
        )  # fmt: skip
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        self.sock = socket.create_server((cfg.host, cfg.port), family=family, backlog=1024)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{port}/score"
        self.serving = app.state.serving

    def handle_exit(self, sig, frame) -> None:
        self.serving["closing"] = True
        super().handle_exit(sig, frame)

    def stop(self) -> None:
        """Stop from another thread (as SIGTERM does in the main one)."""
        self.serving["closing"] = True
        self.should_exit = True

    def serve_forever(self) -> None:
        self.run(sockets=[self.sock])


def make_server(scorer, cfg: ServeRewardConfig, token: str = "") -> RewardServer:
    """A server for `scorer` with cfg's limits, listening already; `serve_forever()` runs it until stopped."""
    return RewardServer(build_app(scorer, cfg, token), cfg)


def run(config: str | None = None, overrides: list[str] | tuple = ()) -> None:
    cfg: ServeRewardConfig = load_config(ServeRewardConfig, config, list(overrides))
    token = read_token(cfg.token_file)
    scorer = load_scorers([cfg.scorer] if cfg.scorer else [], {cfg.scorer: cfg.scorer_args} if cfg.scorer_args else {})
    server = make_server(scorer[cfg.scorer], cfg, token)
    how = "token required" if token else "no token"
    print(f"serving {cfg.scorer} on {server.url} ({how}; Ctrl-C or SIGTERM stops)", flush=True)
    server.serve_forever()
