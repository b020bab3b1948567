"""Build a cache folder (layout: cache.py) with every process, one atomic shard at a time, resumable after a kill.

The source's pairs are cut into chunks of `shard_size` consecutive pairs; process r of W encodes the chunks
c with c % W == r (VAE latents) into pairs-<c>.safetensors. After a barrier, the captions the chunks name are
deduplicated by hash and sorted, cut into chunks of `shard_size` captions, and encoded the same way (text
encoders) into text-<j>.safetensors. After a last barrier the main process writes index.json. A shard file only
exists once complete (shards.write_shard), so a rerun after a crash or kill -9 skips every finished shard; the
chunks depend only on the source, so 1 and W processes write the same files, batch for batch.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffalign.data.cache import (
    SHARD_SIZE,
    CacheError,
    cache_info,
    cache_key,
    caption_hash,
    differences,
    read_index,
    read_json,
)
from diffalign.data.images import hflip as flip_image
from diffalign.data.pairs import PreferencePairs, PreferencePairStream, collate, load_pair, plain_view
from diffalign.data.readers import DataError
from diffalign.data.shards import ShardFile, write_shard

logger = logging.getLogger(__name__)


def _encode_pairs(family, batch: dict, hflip: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One collated batch of B pairs -> the tensors one pairs shard holds for them (latents in `dtype`)."""
    pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]])  # 2 x (B, 3, R, R) -> (2B, 3, R, R)
    x0_w, x0_l = family.encode_images(pixels).to(dtype).chunk(2)  # (2B, C, h, w) -> 2 x (B, C, h, w)
    out = {
        "x0_w": x0_w,
        "x0_l": x0_l,
        "size_info_w": batch["size_info_w"],
        "size_info_l": batch["size_info_l"],
        "label": batch["label"],
        "index": batch["index"],
        "caption": torch.tensor([caption_hash(p) for p in batch["prompt"]], dtype=torch.long),  # (B,)
    }
    if hflip:
        sizes = torch.cat([batch["size_info_w"], batch["size_info_l"]])  # (2B, 4)
        pixels, sizes = flip_image(pixels, sizes)
        flipped = family.encode_images(pixels).to(dtype)  # (2B, C, h, w)
        out["x0_w_flip"], out["x0_l_flip"] = flipped.chunk(2)  # (2B, C, h, w) -> 2 x (B, C, h, w)
        out["size_info_w_flip"], out["size_info_l_flip"] = sizes.chunk(2)  # (2B, 4) -> 2 x (B, 4)
    return out


def _encode_prompts(family, prompts: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """list[str] (m) -> {"cond.<key>": (m, ...)} with floating tensors in `dtype`."""
    cond = family.encode_prompts(prompts)
    return {f"cond.{k}": v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}


def _map_batches(dataset: PreferencePairs, chunks: list[int], size: int, batch_size: int, workers: int) -> Iterator:
    """(chunk, collated batch, last of its chunk) for the given chunks of a map-style source.

    Batches never straddle a chunk."""
    n = len(dataset)
    batches, owner = [], []
    for c in chunks:
        members = list(range(c * size, min((c + 1) * size, n)))
        for i in range(0, len(members), batch_size):
            batches.append(members[i : i + batch_size])
            owner.append((c, i + batch_size >= len(members)))
    loader = DataLoader(plain_view(dataset), batch_sampler=batches, collate_fn=collate, num_workers=workers)
    for (c, last), batch in zip(owner, loader):
        yield c, batch, last


def _stream_batches(dataset: PreferencePairStream, mine: Callable[[int], bool], size: int, batch_size: int):
    """(chunk, collated batch, last of its chunk) for the chunks `mine` accepts; other pairs are read, not decoded."""
    skip_bad = dataset.stream.options["skip_bad_rows"]
    items, current = [], None
    for index, record in enumerate(dataset.stream):
        if dataset.max_pairs > 0 and index >= dataset.max_pairs:
            break
        if not mine(index // size):
            continue
        current = index // size
        try:
            items.append(load_pair(record, dataset.resolution, index))
        except DataError as err:
            if not skip_bad:
                raise
            logger.warning("skipping %s", err)
            items.append(None)  # counted by collate
        last = (index + 1) % size == 0
        if last or len(items) == batch_size:
            yield current, collate(items), last
            items = []
    if items:  # the stream ended inside this chunk
        yield current, collate(items), True


def _is_label_scores(path: Path) -> bool:
    """The per-pair scores that data.label_scorer saves in the cache folder before the cache is built."""
    return path.name.startswith("scores-") and path.suffix == ".json"


def _check_folder(out_dir: Path, key: str, info: dict, rank: int) -> bool:
    """True if `out_dir` holds the finished cache for `key`; starts or resumes a build otherwise."""
    for name in ("index.json", "build.json"):
        existing = read_json(out_dir / name)
        if existing is not None and existing["key"] != key:
            diff = "; ".join(differences(existing["info"], info))
            raise CacheError(
                f"{out_dir}: cache key {existing['key']} != requested {key} ({diff}); delete it or use another dir"
            )
        if existing is not None and name == "index.json":
            return True
    if (out_dir / "build.json").is_file():
        return False
    if out_dir.exists() and any(p for p in out_dir.iterdir() if ".tmp-" not in p.name and not _is_label_scores(p)):
        raise CacheError(f"{out_dir}: exists, is not empty and has no index.json (not a finished diffalign cache)")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"build.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps({"key": key, "info": info}, indent=1))
        os.replace(tmp, out_dir / "build.json")
    return False


def _log(out_dir: Path, name: str, rank: int, pairs: int) -> None:
    with open(out_dir / "build-log.jsonl", "a") as f:
        f.write(json.dumps({"file": name, "rank": rank, "pid": os.getpid(), "items": pairs}) + "\n")


def _log_phases(out_dir: Path, rank: int, seconds: dict[str, float]) -> None:
    """This process's seconds per build phase (pairs, waiting for the others, text), for benchmarks/scale.py."""
    with open(out_dir / "build-phases.jsonl", "a") as f:
        f.write(json.dumps({"phases": seconds, "rank": rank, "pid": os.getpid()}) + "\n")


def build_cache(
    family,
    dataset: PreferencePairs | PreferencePairStream,
    out_dir: str | os.PathLike,
    *,
    model_path: str,
    vae_path: str = "",
    dtype: torch.dtype | None = None,
    batch_size: int = 16,
    shard_size: int = SHARD_SIZE,
    num_workers: int = 0,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
) -> Path:
    """Encode every pair of `dataset` with `family` into `out_dir`; reuse it if finished with the same key.

    `dataset` decides the source, resolution and hflip (both orientations are stored if set); its caption dropout
    is ignored here (CachedPairs applies it). dtype: storage dtype of latents and cond (None = family.dtype).
    Several processes: call on every one with its `rank`, the `world_size` and a `barrier` (e.g.
    accelerator.wait_for_everyone); each encodes its own share. Returns `out_dir`. Raises CacheError if `out_dir`
    holds a cache (finished or not) with another key, or something else; DataError (naming file and row) for a
    corrupt image unless the source skips bad rows. Shards finished before an error are kept for the rerun.
    """
    out_dir, wait = Path(out_dir), barrier or (lambda: None)
    if shard_size < 1 or batch_size < 1:
        raise CacheError(f"{out_dir}: shard_size and batch_size must be >= 1 (got {shard_size}, {batch_size})")
    dtype = dtype or family.dtype
    info = cache_info(family, dataset, model_path, vae_path, dtype)
    key = cache_key(info)
    if _check_folder(out_dir, key, info, rank):
        logger.info("reusing cache %s (key %s, %d pairs)", out_dir, key, read_index(out_dir)["pairs"])
        return out_dir
    if rank == 0:
        for leftover in out_dir.glob("*.tmp-*"):  # a killed build's half-written file; nobody writes yet
            leftover.unlink()
    wait()
    start = time.perf_counter()
    phases: dict[str, float] = {}
    done = {p.name for p in out_dir.glob("*.safetensors")}

    # ---- pairs: my chunks -> pairs-<c>.safetensors ----------------------------------------------------------------
    def mine(c: int) -> bool:
        return c % world_size == rank and f"pairs-{c:05d}.safetensors" not in done

    if isinstance(dataset, PreferencePairs):
        chunks = [c for c in range(-(-len(dataset) // shard_size)) if mine(c)]
        batches = _map_batches(dataset, chunks, shard_size, batch_size, num_workers)
    else:
        batches = _stream_batches(dataset, mine, shard_size, batch_size)
    resumed = len([n for n in done if n.startswith("pairs-")])
    desc = f"caching {out_dir.name}" + (f" (rank {rank}/{world_size})" if world_size > 1 else "")
    desc += f" ({resumed} shards already done)" if resumed else ""
    buffer, current, skipped = [], None, 0

    def flush() -> None:
        tensors = {k: torch.cat([b[k] for b, _ in buffer]) for k in buffer[0][0]} if buffer else {}  # (n, ...)
        prompts = {str(h): p for b, ps in buffer for h, p in zip(b["caption"].tolist(), ps, strict=True)}
        name = f"pairs-{current:05d}.safetensors"
        write_shard(tensors, out_dir / name, {"captions": json.dumps(prompts), "skipped": str(skipped)})
        _log(out_dir, name, rank, len(tensors.get("label", ())))

    for chunk, batch, last in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        current = chunk
        skipped += batch["skipped"]
        if "label" in batch:  # else every item of this batch was a skipped bad image
            buffer.append((_encode_pairs(family, batch, dataset.hflip, dtype), batch["prompt"]))
        if last:  # the chunk is complete: write it now, before anything later can fail
            flush()
            buffer, skipped = [], 0
    phases["pairs_s"] = time.perf_counter() - start
    wait()
    phases["wait_pairs_s"] = time.perf_counter() - start - phases["pairs_s"]
    text_start = time.perf_counter()

    # ---- text: every unique caption once -> text-<j>.safetensors ------------------------------------------------
    pair_files = sorted(out_dir.glob("pairs-*.safetensors"))
    captions: dict[int, str] = {}
    pair_counts, bad_images = [], 0
    for path in pair_files:
        shard = ShardFile(path)
        bad_images += int(shard.metadata["skipped"])
        pair_counts.append(shard.rows("label") if "label" in shard.tensors else 0)
        for h, prompt in json.loads(shard.metadata["captions"]).items():
            if captions.setdefault(int(h), prompt) != prompt:
                raise CacheError(f"{out_dir}: captions {prompt!r} and {captions[int(h)]!r} share a 64-bit hash")
    hashes = sorted(captions)
    text_chunks = [hashes[i : i + shard_size] for i in range(0, len(hashes), shard_size)]
    for j, chunk_hashes in enumerate(text_chunks):
        name = f"text-{j:05d}.safetensors"
        if j % world_size != rank or name in done:
            continue
        parts = [
            _encode_prompts(family, [captions[h] for h in chunk_hashes[i : i + batch_size]], dtype)
            for i in range(0, len(chunk_hashes), batch_size)
        ]
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # list of (b, ...) -> (m, ...)
        write_shard(dict(tensors, caption=torch.tensor(chunk_hashes, dtype=torch.long)), out_dir / name)
        _log(out_dir, name, rank, len(chunk_hashes))
    if rank == 0 and "empty.safetensors" not in done:
        write_shard(_encode_prompts(family, [""], dtype), out_dir / "empty.safetensors")  # (1, ...)
    phases["text_s"] = time.perf_counter() - text_start
    _log_phases(out_dir, rank, phases)
    wait()

    # ---- index: written last, by the main process ---------------------------------------------------------------
    pairs = sum(pair_counts)
    if pairs == 0:
        raise CacheError(f"{out_dir}: no pairs to cache ({bad_images} skipped)")
    counts = dict(dataset.counts, bad_images=bad_images)  # bad_images: undecodable images skipped
    if rank == 0:
        index = {
            "key": key,
            "info": info,
            "pairs": pairs,
            "captions": len(hashes),
            "hflip": dataset.hflip,
            "shards": [{"file": p.name, "pairs": k} for p, k in zip(pair_files, pair_counts, strict=True) if k],
            "text": [f"text-{j:05d}.safetensors" for j in range(len(text_chunks))],
            "counts": counts,
            "build_seconds": time.perf_counter() - start,  # this run, all processes: first barrier -> index
        }
        tmp = out_dir / f"index.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, out_dir / "index.json")
        logger.info("cached %d pairs, %d captions to %s (key %s, counts %s)", pairs, len(hashes), out_dir, key, counts)
    wait()
    return out_dir
