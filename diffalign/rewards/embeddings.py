"""CLIP-style encoders: images and prompts -> embeddings, batched, weights loaded once.

Two backbones with the same three members, so every scorer and every distributional reward can use either:
`embed_images(images) -> (N, D)`, `embed_texts(prompts) -> (N, D)` (projected, *not* normalised) and `logit_scale`.
- `ClipEncoder`: a transformers `CLIPModel` + `CLIPProcessor` (hub id or local folder; the processor may come from
  another id, as PickScore does).
- `OpenClipEncoder`: an open_clip architecture by name + a local checkpoint (HPSv2, open_clip CLIP score).
Any scorer built on one exposes it as `scorer.encoder`, which is how distributional rewards reuse a scorer's
embedding. `name` identifies the encoder in exemplar-cache keys.

`ExemplarSet` embeds a set of exemplar images (or texts) once and caches embeddings, mean and covariance to a
safetensors file keyed by encoder + content hash; distributional rewards score against it.

Weight files: `.safetensors` load as is; a torch pickle (`.pt`, `.pth`, `.bin`) only with `allow_pickle=True`, and
then through `torch.load(weights_only=True)`, which refuses arbitrary objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file

from diffalign.rewards.preprocess import ClipPreprocess, Images


def gaussian_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) -> mean (D,), covariance (D, D) with the N-1 denominator (numpy `np.cov`, as clean-fid), float64."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) embeddings, got {tuple(x.shape)}")
    x = x.double()
    mu = x.mean(0)
    xc = x - mu  # (N, D)
    return mu, xc.T @ xc / (x.shape[0] - 1)  # (D, N) @ (N, D) -> (D, D)


def load_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors`, or from a torch pickle when `allow_pickle` (weights_only=True).

    Unwraps `{"state_dict": ...}` (HPSv2 checkpoints) and a DDP `module.` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(path)
    elif not allow_pickle:
        raise ValueError(
            f"{path} is a torch pickle: pass allow_pickle=True to load it (weights_only) or convert it to .safetensors"
        )
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state["state_dict"] if "state_dict" in state else state
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _in_batches(fn, items: Sequence | torch.Tensor, batch_size: int) -> torch.Tensor:
    """fn over consecutive chunks of `items`, concatenated along dim 0."""
    if len(items) == 0:
        raise ValueError("nothing to embed: got an empty batch")
    return torch.cat([fn(items[i : i + batch_size]) for i in range(0, len(items), batch_size)])


@dataclass
class ClipEncoder:
    """transformers `CLIPModel`: projected image / text embeddings (`get_*_features(...).pooler_output`)."""

    model: torch.nn.Module
    tokenizer: object
    preprocess: ClipPreprocess
    name: str
    batch_size: int = 32
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @classmethod
    def load(
        cls,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> ClipEncoder:
        """`model`: hub id or `save_pretrained` folder; `processor`: the same for the processor (default: `model`)."""
        from transformers import CLIPModel, CLIPProcessor

        proc = CLIPProcessor.from_pretrained(processor or model)
        # transformers 5 returns a 2-token tokenizer instead of raising when the hub is unreachable.
        if len(proc.tokenizer) <= 2:
            raise OSError(f"tokenizer of '{processor or model}' has {len(proc.tokenizer)} tokens: not found offline?")
        net = CLIPModel.from_pretrained(model, dtype=dtype).to(device).eval()
        pre = ClipPreprocess.from_hf(proc.image_processor)
        return cls(
            net, proc.tokenizer, pre, f"hf:{model}|{processor or model}", batch_size, torch.device(device), dtype
        )

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.float()

    def embed_images(self, images: Images) -> torch.Tensor:
        """PIL list or (N, 3, H, W) in [0, 1] -> (N, D) float32."""

        def embed(chunk):
            pixels = self.preprocess(chunk).to(self.device, self.dtype)  # (n, 3, crop, crop)
            return self.model.get_image_features(pixel_values=pixels).pooler_output.float()

        return _in_batches(embed, images, self.batch_size)

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """N prompts -> (N, D) float32; padded to the full context so results do not depend on the batch."""

        def embed(chunk):
            length = self.model.config.text_config.max_position_embeddings  # 77 for every CLIP
            tok = self.tokenizer(
                list(chunk), padding="max_length", truncation=True, max_length=length, return_tensors="pt"
            )
            tok = {k: v.to(self.device) for k, v in tok.items()}
            return self.model.get_text_features(**tok).pooler_output.float()

        return _in_batches(embed, list(prompts), self.batch_size)


@dataclass
class OpenClipEncoder:
    """open_clip CLIP model: `encode_image` / `encode_text` (projected)."""

    model: torch.nn.Module
    tokenizer: object
    preprocess: ClipPreprocess
    name: str
    batch_size: int = 32
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @classmethod
    def load(
        cls,
        model_name: str,
        checkpoint: str | Path,
        allow_pickle: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> OpenClipEncoder:
        """Architecture `model_name` (a built-in open_clip config or one added with `open_clip.add_model_config`),
        weights from a local `checkpoint` holding the full state dict (strict load; nothing is downloaded)."""
        import open_clip

        net, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=None)
        net.load_state_dict(load_weights(checkpoint, allow_pickle), strict=True)
        net = net.to(device=device, dtype=dtype).eval()
        pre = ClipPreprocess.from_open_clip(net, transform)
        tok = open_clip.get_tokenizer(model_name)
        return cls(
            net, tok, pre, f"open_clip:{model_name}|{Path(checkpoint).name}", batch_size, torch.device(device), dtype
        )

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.float()

    def embed_images(self, images: Images) -> torch.Tensor:
        """PIL list or (N, 3, H, W) in [0, 1] -> (N, D) float32."""

        def embed(chunk):
            return self.model.encode_image(self.preprocess(chunk).to(self.device, self.dtype)).float()

        return _in_batches(embed, images, self.batch_size)

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """N prompts -> (N, D) float32 (open_clip pads every prompt to the context length)."""

        def embed(chunk):
            return self.model.encode_text(self.tokenizer(list(chunk)).to(self.device)).float()

        return _in_batches(embed, list(prompts), self.batch_size)


def cosine_pairs(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine of row i of each: (N, D), (N, D) -> (N,)."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"{image_emb.shape[0]} images but {text_emb.shape[0]} prompts")
    return torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)  # (N, D) -> (N,)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_exemplars(path: str | Path) -> list[Image.Image] | list[str]:
    """A folder of images (sorted by name) or a .txt file with one text per line -> the exemplar list."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
        return [Image.open(p).convert("RGB") for p in files]
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise ValueError(f"exemplars must be a folder of images or a .txt file of texts, got {path}")


def content_hash(items: Images | Sequence[str]) -> str:
    """sha256 over the exemplar content: pixels (PIL mode, size, bytes; or tensor shape + float32 bytes) or texts."""
    h = hashlib.sha256()
    if isinstance(items, torch.Tensor):
        h.update(f"tensor{tuple(items.shape)}".encode())
        h.update(items.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    for item in items:
        if isinstance(item, str):
            h.update(b"text\0" + item.encode("utf-8"))
        else:
            h.update(f"pil{item.mode}{item.size}".encode() + item.tobytes())
    return h.hexdigest()


@dataclass
class ExemplarSet:
    """Embeddings of an exemplar set and their Gaussian fit, computed once per (encoder, content)."""

    embeddings: torch.Tensor
    """(M, D) float32, L2-normalised when built with normalize=True."""
    mu: torch.Tensor
    """(D,) float64."""
    cov: torch.Tensor
    """(D, D) float64, N-1 denominator."""
    key: str
    """sha256 of encoder name, normalize flag, modality and content hash; names the cache file."""

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        encoder: ClipEncoder | OpenClipEncoder,
        exemplars: Images | Sequence[str],
        normalize: bool = False,
        cache_dir: str | Path | None = None,
    ) -> ExemplarSet:
        """Embed `exemplars` (images, or texts through the text tower), or read them from `cache_dir` if cached."""
        texts = not isinstance(exemplars, torch.Tensor) and all(isinstance(e, str) for e in exemplars)
        tag = f"{encoder.name}|normalize={normalize}|{'text' if texts else 'image'}|{content_hash(exemplars)}"
        key = hashlib.sha256(tag.encode()).hexdigest()[:32]
        path = Path(cache_dir) / f"exemplars-{key}.safetensors" if cache_dir is not None else None
        if path is not None and path.is_file():
            return cls.load(path, key)
        emb = encoder.embed_texts(exemplars) if texts else encoder.embed_images(exemplars)  # (M, D)
        if normalize:
            emb = emb / emb.norm(dim=-1, keepdim=True)
        mu, cov = gaussian_stats(emb)
        out = cls(emb.float().cpu(), mu.cpu(), cov.cpu(), key)
        if path is not None:
            out.save(path)
        return out

    def to(self, device: str | torch.device) -> ExemplarSet:
        return ExemplarSet(self.embeddings.to(device), self.mu.to(device), self.cov.to(device), self.key)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tensors = {"embeddings": self.embeddings, "mu": self.mu, "cov": self.cov}
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(path), metadata={"key": self.key})

    @classmethod
    def load(cls, path: str | Path, key: str | None = None) -> ExemplarSet:
        """Read a saved set; with `key`, refuse a file written for another encoder or content."""
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata()["key"]
            if key is not None and stored != key:
                raise ValueError(f"{path} holds exemplar set {stored}, expected {key}")
            return cls(f.get_tensor("embeddings"), f.get_tensor("mu"), f.get_tensor("cov"), stored)
