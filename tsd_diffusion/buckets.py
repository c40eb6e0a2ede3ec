"""Aspect-ratio bucketing (kohya's ``--enable_bucket``): images of any shape train without being stretched.

**Buckets.** With ``resolution`` R, ``--min_bucket_reso`` m, ``--max_bucket_reso`` M and ``--bucket_reso_steps``
k (kohya's ``make_bucket_resolutions``): for every width w in m, m+k, ..., M the bucket's height is
``min(M, floor(R² / w / k) k)``, kept when it is at least m; each bucket is added with its transpose. Every
bucket holds about R² pixels (at most R²) and both sides are multiples of k.

**Assignment.** An image of size (h, w) goes to the bucket whose aspect ratio is nearest to its own in log scale
(``|log(w_b/h_b) - log(w/h)|``, ties to the earlier bucket of :attr:`Buckets.sizes`). With
``--bucket_no_upscale`` the bucket is the image's own size instead, scaled down to at most R² pixels (when
larger) and to at most M per side, each side rounded down to a multiple of k: no image is enlarged. An image
whose bucket would then have a side below m is *excluded* (:meth:`Buckets.assign` returns None); the trainer
refuses such data before any compute rather than dropping images.

The image is then resized, keeping its aspect ratio, to the smallest size that covers the bucket and cropped
to it (centre or random crop, as without buckets): see :class:`tsd_diffusion.data.SDXLTransform`.

**Schedule.** :class:`BucketBatchSampler` builds each epoch's batches from ``(seed, epoch)`` alone: the items of
every bucket are shuffled and cut into batches of ``batch_size`` (the last one of a bucket may be smaller), and
the batches are shuffled. So a batch holds one bucket, the schedule is the same on every process and in every
run with the same ``--seed``, and a resumed run can skip the batches of the current epoch it had consumed. With
P processes and gradient accumulation G the epoch's batches are padded (by repeating its first batches) to a
multiple of P·G; process p takes batches p, p+P, p+2P, ...
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from shared.errors import InputError

#: the spatial factor every bucket side must be a multiple of (SDXL's VAE downsamples by 8)
SIDE_MULTIPLE = 8


@dataclass(frozen=True)
class Buckets:
    """The bucket sizes of a run, (height, width) each; :meth:`build` checks the settings and makes them."""

    resolution: int
    min_reso: int
    max_reso: int
    step: int
    no_upscale: bool
    sizes: tuple[tuple[int, int], ...]

    @classmethod
    def build(cls, resolution: int, min_reso: int, max_reso: int, step: int, no_upscale: bool = False) -> Buckets:
        """Buckets of about ``resolution²`` pixels between ``min_reso`` and ``max_reso`` per side, in multiples of
        ``step``; a setting that leaves no bucket, or sides that are not multiples, is an :class:`InputError`
        naming the flag."""
        if step <= 0 or step % SIDE_MULTIPLE:
            raise InputError(f"--bucket_reso_steps must be a positive multiple of {SIDE_MULTIPLE}, got {step}")
        for flag, value in (("--min_bucket_reso", min_reso), ("--max_bucket_reso", max_reso),
                            ("--resolution", resolution)):
            if value <= 0 or value % step:
                raise InputError(f"{flag} {value} must be a positive multiple of --bucket_reso_steps {step} "
                                 "with --enable_bucket")
        if not min_reso <= resolution <= max_reso:
            raise InputError(f"--enable_bucket needs --min_bucket_reso <= --resolution <= --max_bucket_reso, got "
                             f"{min_reso} <= {resolution} <= {max_reso}")
        area = resolution * resolution
        sizes = {(resolution, resolution)}
        for w in range(min_reso, max_reso + 1, step):
            h = min(max_reso, area // w // step * step)
            if h >= min_reso:
                sizes |= {(h, w), (w, h)}
        return cls(resolution, min_reso, max_reso, step, no_upscale, tuple(sorted(sizes)))

    def assign(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """The bucket (height, width) of an image of ``size`` (height, width); None when it is excluded (see the
        module docstring)."""
        h, w = size
        if not self.no_upscale:
            ratio = math.log(w / h)
            return min(self.sizes, key=lambda s: abs(math.log(s[1] / s[0]) - ratio))
        area = self.resolution * self.resolution
        scale = min(1.0, math.sqrt(area / (h * w)), self.max_reso / max(h, w))
        bh, bw = (int(h * scale) // self.step * self.step, int(w * scale) // self.step * self.step)
        return (bh, bw) if min(bh, bw) >= self.min_reso else None


def describe_assignment(names: Sequence[str], buckets: Sequence[tuple[int, int]]) -> str:
    """The bucket assignment as the trainer prints it at start-up: one line per bucket (width x height, as kohya
    prints them), largest share first, with its image count and the images' names."""
    by_bucket: dict[tuple[int, int], list[str]] = {}
    for name, bucket in zip(names, buckets, strict=True):
        by_bucket.setdefault(bucket, []).append(name)
    lines = [f"buckets: {len(names)} images in {len(by_bucket)} bucket(s)"]
    lines += [f"  {w}x{h}: {len(ns)} image(s): {', '.join(ns)}"
              for (h, w), ns in sorted(by_bucket.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    return "\n".join(lines)


def epoch_rng(seed: int, epoch: int, what: str) -> random.Random:
    """A ``random.Random`` drawn from ``(seed, epoch, what)`` alone (the same on every process and platform)."""
    material = f"tsd-buckets:{what}:{seed}:{epoch}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(material).digest()[:8], "little"))


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices, one bucket per batch, from a schedule seeded by ``(seed, epoch)``.

    ``item_buckets[i]`` is the bucket of dataset item ``i``. :meth:`schedule` is the epoch's global batch list;
    iterating yields this process's share (``num_replicas`` processes, this one ``rank``), padded so that every
    process gets the same number of batches and that number is a multiple of ``multiple_of`` (the gradient
    accumulation steps, so that an epoch is a whole number of optimizer steps). Call :meth:`set_epoch` before
    every epoch.
    """

    def __init__(self, item_buckets: Sequence[tuple[int, int]], batch_size: int, seed: int, *, num_replicas: int = 1,
                 rank: int = 0, multiple_of: int = 1) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.item_buckets = list(item_buckets)
        self.batch_size, self.seed = batch_size, seed
        self.num_replicas, self.rank, self.multiple_of = num_replicas, rank, multiple_of
        self.epoch = 0
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, bucket in enumerate(self.item_buckets):
            self.groups.setdefault(bucket, []).append(i)
        self.num_batches = sum(math.ceil(len(g) / batch_size) for g in self.groups.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def schedule(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch`` in order, before padding and sharding."""
        rng = epoch_rng(self.seed, epoch, "schedule")
        batches = []
        for bucket in sorted(self.groups):
            items = list(self.groups[bucket])
            rng.shuffle(items)
            batches += [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        per = self.num_replicas * self.multiple_of
        return math.ceil(self.num_batches / per) * self.multiple_of

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.schedule(self.epoch)
        total = len(self) * self.num_replicas
        padded = [batches[i % len(batches)] for i in range(total)]
        yield from padded[self.rank::self.num_replicas]
