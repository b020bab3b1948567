"""A scorer that runs elsewhere: images and prompts are POSTed to an HTTP endpoint, scores come back.

Lets a heavy reward (a VLM judge, GenEval's detector) live on another GPU or machine, as Flow-GRPO's and
VeRL-Omni's reward servers do. `diffalign serve-reward SCORER` (pipelines/serve_reward.py) is the matching server;
any server that speaks the same JSON works:

    POST <endpoint>   {"prompts": [str] * n, "images": [base64 PNG] * n}
    200               {"scores": [float] * n}
    4xx / 5xx         {"error": "one line"}

Images travel as lossless PNG of the uint8-rounded pixels (a tensor in [0, 1] is rounded as when saved to disk).
Each request carries at most `batch_size` images. A connection failure, a timeout or a 5xx answer is retried
`retries` times with a 2^k · `backoff` second wait; a 4xx answer (bad input) is not retried. Any failure raises one
line that names the endpoint. Not differentiable.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from diffalign.errors import DiffalignError
from diffalign.rewards.geneval import to_pil
from diffalign.rewards.preprocess import Images


def encode_png(image: Image.Image) -> str:
    """PIL image -> base64 text of its PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> Image.Image:
    """base64 PNG (or any PIL-readable format) -> RGB PIL image."""
    return Image.open(io.BytesIO(base64.b64decode(text, validate=True))).convert("RGB")


def _server_message(err: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(err.read())["error"])
    except Exception:  # a non-JSON error page: the status line is all we can say
        return err.reason if isinstance(err.reason, str) else "no message"


@dataclass
class RemoteScore:
    endpoint: str
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 1.0
    batch_size: int = 64

    @classmethod
    def load(
        cls, endpoint: str, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0, batch_size: int = 64
    ) -> RemoteScore:
        """`endpoint`: the server's URL (http://host:port/score); `timeout`: seconds per request; `retries`: extra
        tries after a failed one; `backoff`: the first wait, doubled each retry; `batch_size`: images per request."""
        if not endpoint.startswith(("http://", "https://")):
            raise DiffalignError(f"remote reward: endpoint '{endpoint}' must start with http:// or https://")
        if retries < 0 or timeout <= 0 or batch_size < 1:
            raise DiffalignError(f"remote reward {endpoint}: need retries >= 0, timeout > 0, batch_size >= 1")
        return cls(endpoint, timeout, retries, backoff, batch_size)

    def post(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """One request (with retries) -> len(images) scores."""
        body = json.dumps({"prompts": prompts, "images": [encode_png(im) for im in images]}).encode()
        request = urllib.request.Request(self.endpoint, data=body, headers={"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    scores = json.loads(response.read())["scores"]
                break
            except urllib.error.HTTPError as err:
                reason = f"HTTP {err.code}: {_server_message(err)}"
                if err.code < 500:
                    raise DiffalignError(f"remote reward {self.endpoint}: {reason}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, timed out, cut
                reason = str(getattr(err, "reason", err))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DiffalignError(f"remote reward {self.endpoint}: answer is not JSON with 'scores'") from None
            if attempt == self.retries:
                raise DiffalignError(f"remote reward {self.endpoint}: {reason} (after {attempt + 1} tries)")
            time.sleep(self.backoff * 2**attempt)
        if not isinstance(scores, list) or len(scores) != len(images):
            got = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise DiffalignError(f"remote reward {self.endpoint}: {got} scores for {len(images)} images")
        return [float(s) for s in scores]

    def __call__(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """N images, N prompts -> (N,) scores from the server."""
        pils = to_pil(images)
        if len(pils) != len(prompts):
            raise ValueError(f"{len(pils)} images but {len(prompts)} prompts")
        scores = []
        for i in range(0, len(pils), self.batch_size):
            scores += self.post(pils[i : i + self.batch_size], list(prompts[i : i + self.batch_size]))
        return torch.tensor(scores, dtype=torch.float32)
