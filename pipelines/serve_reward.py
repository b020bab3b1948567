"""`diffalign serve-reward SCORER [scorer_args={...}] [host=127.0.0.1] [port=8765]`: serve one scorer over HTTP.

The server side of the `remote` scorer (diffalign/rewards/remote.py, which documents the JSON protocol): load any
SCORERS entry once, then answer `POST /score` with its scores and `GET /health` with its name. Requests are
handled one at a time (the scorer holds one model; a GPU serves one batch at a time anyway). Bad input (not JSON,
lengths that differ, an image that does not decode, more than `max_images`, a body over `max_request_mb`, a prompt
the scorer rejects) answers 400 with a one-line error; a scorer crash answers 500. Stop it with Ctrl-C.

    # on the GPU machine
    diffalign serve-reward vlm_judge scorer_args="{device: cuda}" host=0.0.0.0 port=8765
    # in the training run
    diffalign online ... reward.scorer=remote reward.args="{endpoint: http://gpu-host:8765/score}"

SCORER may also be a YAML file with the keys below; the CLI turns a bare NAME into `scorer=NAME` (its COMMANDS).
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, HTTPServer

from diffalign.pipelines.score import load_scorers

from diffalign.config import ServeRewardConfig, load_config
from diffalign.rewards.remote import decode_png


class BadRequest(ValueError):
    """A request the server answers with 400."""


def score_request(scorer, body: bytes, max_images: int) -> list[float]:
    """JSON body {"prompts", "images": base64 PNG} -> scores; BadRequest names what is wrong."""
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
    try:
        return [float(s) for s in scorer(pils, prompts)]
    except ValueError as err:  # the scorer's own bad-input error (a prompt it cannot parse, ...)
        raise BadRequest(" ".join(str(err).split())) from None


def make_server(scorer, name: str, host: str, port: int, max_images: int = 256, max_bytes: int = 512 << 20):
    """An HTTPServer answering POST /score and GET /health for `scorer`; call `serve_forever()` on it."""

    class Handler(BaseHTTPRequestHandler):
        def reply(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path != "/health":
                return self.reply(404, {"error": f"unknown path {self.path}; use POST /score or GET /health"})
            self.reply(200, {"scorer": name})

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                return self.reply(404, {"error": f"unknown path {self.path}; use POST /score"})
            size = int(self.headers.get("Content-Length") or 0)
            if size > max_bytes:
                self.close_connection = True  # the unread body must not be parsed as the next request
                return self.reply(413, {"error": f"request of {size} bytes; the server takes at most {max_bytes}"})
            try:
                self.reply(200, {"scores": score_request(scorer, self.rfile.read(size), max_images)})
            except BadRequest as err:
                self.reply(400, {"error": str(err)})
            except Exception as err:  # a scorer crash: report it, keep serving
                self.reply(500, {"error": f"{type(err).__name__}: {' '.join(str(err).split())}"})

        def log_message(self, fmt, *args):  # one short line per request instead of http.server's default
            print(f"serve-reward {name}: {self.address_string()} {fmt % args}", flush=True)

    return HTTPServer((host, port), Handler)


def run(config: str | None = None, overrides: list[str] | tuple = ()) -> None:
    cfg: ServeRewardConfig = load_config(ServeRewardConfig, config, list(overrides))
    scorer = load_scorers([cfg.scorer] if cfg.scorer else [], {cfg.scorer: cfg.scorer_args} if cfg.scorer_args else {})
    server = make_server(
        scorer[cfg.scorer], cfg.scorer, cfg.host, cfg.port, cfg.max_images, int(cfg.max_request_mb * 2**20)
    )
    host, port = server.server_address[:2]
    print(f"serving {cfg.scorer} on http://{host}:{port}/score (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
