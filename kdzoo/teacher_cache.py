"""The teacher-output cache (``--teacher-cache``): each training sample's teacher logits, stored
once per (sample, augmentation choice) and read back instead of running the teacher again.

Why it is correct. For a method that reads nothing of the teacher but its logits
(``Method.logits_only_teacher``) and hands the teacher exactly the student's augmented batch
(it does not override ``prepare_batch``), the teacher's output for a sample is a function of the
pixels it sees alone: its weights are frozen and it runs in eval mode. On an in-memory dataset
those pixels are fixed by (dataset index, augmentation choice), and the standard augmentation
(:class:`~kdzoo.data.loaders.CropFlip`) has a finite, numbered set of choices. So the entry's
key is ``index · choices + choice`` and everything else that shapes the output — the teacher's
weights, the training images themselves, input size, normalisation, augmentation, the
precision it runs at — goes into the cache's identity (:class:`CacheKey`), a folder of its own
under ``<output>/teacher-cache/``. A folder whose recorded identity differs, or a part file
that names another cache, is refused, never read.

Storage is lossless: each logit is kept in the dtype the teacher outputs (bfloat16 under
``amp`` on CUDA, 2 bytes; float32 otherwise), found by one probe forward when the cache opens and
recorded in its identity. A hit therefore returns the very bits the teacher computed for that
image in the batch that filled it. An eval-mode network's output for an image does not depend on
the other images, but a different batch size may take a different kernel path: hits filled at the
run's batch size are bit for bit what the teacher would compute again; hits filled at another
(another world size) agree to float32's last bits. So the cache changes no result: like
``--compile`` it is recorded in ``config.json`` but is not part of the run id or recipe hash.
(A measured alternative, float16 storage of float32 logits, moved 1-epoch top-1 on ``shapes`` by
up to ±1.2 points; benchmarks/RESULTS.md.)

Filling: a batch with any key missing runs the teacher on the whole batch (fixed shapes for
cuDNN and ``torch.compile``) and stores the missing rows; a batch whose keys are all present
skips the teacher. New rows are kept on the training device and written, at each epoch's end,
as one part file (atomic: a temporary file renamed into place), so parallel runs sharing a cache
never write the same file and a crash never leaves a half-written part.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import atomic_write_bytes, atomic_write_json, read_checkpoint, strict_json
from .data.loaders import InMemoryLoader
from .errors import UserError

FORMAT = 1
FOLDER = "teacher-cache"


def weights_hash(module: nn.Module) -> str:
    """16 hex digits over every parameter and buffer (name, dtype, shape, bytes) of ``module``."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def images_hash(images: Tensor, targets: Tensor) -> str:
    """16 hex digits over a training set held in memory, pixels and labels: generated data
    (``shapes``) or data read from a root are then identified by what they are, not by a name."""
    h = hashlib.sha256()
    for t in (images, targets):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CacheKey:
    """Everything a cached logit depends on besides its (index, choice) key."""

    teacher: str            # the teacher's model name (its architecture, with the small-input stem flag)
    teacher_weights: str    # weights_hash of the frozen teacher
    data: str               # images_hash of the training set
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: str       # repr of the dataset's augmentation, e.g. CropFlip(padding=2, flip=True)
    choices: int            # how many augmentation choices each sample has
    precision: str          # "bf16-autocast" or "float32": what the teacher computes in
    num_classes: int
    storage: str            # the dtype the teacher's logits come out in, and are kept in: "bfloat16", "float32"
    format: int = FORMAT

    def record(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def id(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:16]


class TeacherCache:
    """One cache's entries: sorted int64 keys and their logits, on the training device (or the
    host, when they would not fit: :func:`storage_device`).

    ``lookup`` finds a batch's keys with one ``searchsorted``; rows the teacher computes for
    missing keys wait in ``pending`` until ``flush`` writes them as a part file and merges them
    into the sorted table.
    """

    def __init__(self, root: str | Path | None, key: CacheKey, device: torch.device, writer: bool = True,
                 name: str = "run"):
        """``root`` None: a cache in memory only, read from and written to no folder."""
        self.key, self.device, self.name = key, torch.device(device), name
        self.folder = Path(root) / FOLDER / key.id() if root is not None else None
        self.writer = writer and self.folder is not None
        self.keys = torch.empty(0, dtype=torch.long, device=self.device)
        self.dtype = getattr(torch, key.storage)
        self.values = torch.empty(0, key.num_classes, dtype=self.dtype, device=self.device)
        self.pending: list[tuple[Tensor, Tensor]] = []
        self.hits = self.misses = 0            # images served from the cache / computed by the teacher
        self.teacher_seconds = 0.0             # time the teacher forwards of this run took (misses)
        self.loaded_parts = 0
        self._parts_written = 0
        if self.folder is not None:
            self._open()

    # -- the folder ------------------------------------------------------------------------
    def _open(self) -> None:
        record_path = self.folder / "key.json"
        expected = self.key.record()
        if record_path.is_file():
            try:
                found = json.loads(record_path.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"teacher cache {self.folder} has an unreadable key.json ({e}); remove the folder "
                                "(rm -r it) and run again: it is refilled") from None
            if found != expected:
                changed = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
                raise UserError(f"teacher cache {self.folder} was made for another teacher, data or recipe "
                                f"(differs in: {', '.join(changed)}); it is never used for this run: remove the "
                                "folder (rm -r it) and run again")
        elif self.writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(record_path, expected)
        for part in sorted(self.folder.glob("part-*.pt")):
            self._load_part(part)

    def _load_part(self, path: Path) -> None:
        data = read_checkpoint(path, "teacher cache part")
        where = f"teacher cache part {path}"
        if not isinstance(data, dict) or data.get("cache") != self.key.id():
            raise UserError(f"{where} does not belong to this cache ({self.key.id()}); remove that file and run again")
        keys, values = data.get("keys"), data.get("logits")
        ok = (isinstance(keys, Tensor) and isinstance(values, Tensor) and keys.dtype == torch.long
              and values.dtype == self.dtype and keys.dim() == 1 and values.shape == (len(keys), self.key.num_classes))
        if not ok:
            raise UserError(f"{where} is not a kdzoo teacher cache part of this shape; remove that file and run again")
        self._merge(keys.to(self.device), values.to(self.device))
        self.loaded_parts += 1

    def _merge(self, keys: Tensor, values: Tensor) -> None:
        """Add rows to the sorted table; a key already present keeps its first value."""
        keys, values = torch.cat([self.keys, keys]), torch.cat([self.values, values])
        order = torch.sort(keys, stable=True).indices  # earlier (existing) rows first among equals
        keys, values = keys[order], values[order]
        first = torch.ones_like(keys, dtype=torch.bool)
        first[1:] = keys[1:] != keys[:-1]
        self.keys, self.values = keys[first], values[first]

    # -- a training step ---------------------------------------------------------------------
    def lookup(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """(stored logits — rows of misses are zeros —, hit mask) for ``keys``, on the keys' device
        (the table may live elsewhere: see :func:`storage_device`)."""
        if not len(self.keys):
            return (torch.zeros(len(keys), self.key.num_classes, dtype=self.dtype, device=keys.device),
                    torch.zeros(len(keys), dtype=torch.bool, device=keys.device))
        query = keys.to(self.device)
        pos = torch.searchsorted(self.keys, query).clamp_(max=len(self.keys) - 1)
        hit = self.keys[pos] == query
        stored = torch.where(hit[:, None], self.values[pos], torch.zeros((), dtype=self.dtype, device=self.device))
        return stored.to(keys.device), hit.to(keys.device)

    def teacher_logits(self, keys: Tensor, teacher: Any, images: Tensor) -> Tensor:
        """The batch's teacher logits, from the cache where present, from ``teacher(images)`` (and
        stored) where not. Reads one hit count from the device per step."""
        stored, hit = self.lookup(keys)
        n_hit = int(hit.sum())
        self.hits += n_hit
        if n_hit == len(keys):
            return stored
        self.misses += len(keys) - n_hit
        start = time.perf_counter()
        with torch.no_grad():
            computed = teacher(images)
        if computed.dtype != self.dtype:
            raise RuntimeError(f"the teacher's logits came out as {computed.dtype}, the cache keeps {self.dtype}")
        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)
        self.teacher_seconds += time.perf_counter() - start
        missing = ~hit
        self.pending.append((keys[missing].to(self.device), computed[missing].to(self.device)))
        return torch.where(hit[:, None], stored, computed)

    def fill(self, keys: Tensor, logits: Tensor) -> None:
        """Store precomputed rows at once (:func:`fill_every_choice`); they are written by the next flush."""
        keys, logits = keys.to(self.device), logits.to(self.device, self.dtype)
        self.pending.append((keys, logits))
        self._merge(keys, logits)

    def _take_pending(self) -> tuple[Tensor, Tensor]:
        keys = torch.cat([k for k, _ in self.pending])
        values = torch.cat([v for _, v in self.pending])
        self.pending = []
        return keys, values

    def flush(self, tag: str) -> int:
        """Write the rows added since the last flush as one part file (the writer only) and merge
        them into the table, so the next epoch finds them. Returns how many rows were new."""
        if not self.pending:
            return 0
        keys, values = self._take_pending()
        self._merge(keys, values)
        if self.writer:
            buffer = _serialise({"cache": self.key.id(), "keys": keys.cpu(), "logits": values.cpu()})
            self._parts_written += 1
            atomic_write_bytes(self.folder / f"part-{self.name}-{tag}-{os.getpid()}-{self._parts_written}.pt", buffer)
        return len(keys)

    def stats(self) -> dict[str, Any]:
        """What the run's result.json records about the cache."""
        served = self.hits + self.misses
        per_image = self.teacher_seconds / self.misses if self.misses else None
        return {
            "id": self.key.id(), "folder": str(self.folder) if self.folder else None, "on": str(self.device),
            "entries": len(self.keys),
            "hits": self.hits, "misses": self.misses, "hit_rate": self.hits / served if served else None,
            "teacher_seconds": round(self.teacher_seconds, 3),
            "teacher_seconds_saved": round(per_image * self.hits, 3) if per_image is not None else None,
        }

    def __repr__(self) -> str:
        return f"TeacherCache({self.folder}, {len(self.keys)} entries)"


def fill_every_choice(cache: TeacherCache, teacher: nn.Module, images: Tensor, index: Tensor, augment, inputs,
                      batch_size: int) -> int:
    """Fill the cache ahead for ``images`` (raw, at dataset positions ``index``) under every
    augmentation choice: ``choices`` teacher passes over them. Returns the rows added."""
    from .data.loaders import to_float

    added = 0
    with torch.no_grad(), inputs.autocast():
        for start in range(0, len(index), batch_size):
            x, i = to_float(images[start:start + batch_size]), index[start:start + batch_size]
            for choice in range(augment.choices):
                chosen = torch.full_like(i, choice)
                cache.fill(i * augment.choices + chosen, teacher(inputs(augment.apply(x, chosen))))
                added += len(i)
    return added


def _serialise(obj: dict[str, Any]) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def describe(key: CacheKey) -> str:
    """The key as one JSON line (for messages and the docs)."""
    return strict_json(key.record(), indent=None)


class RecordedAugment:
    """The dataset's augmentation, remembering the choice of each image it augments in a step,
    so the step can key the teacher's input by (dataset index, choice)."""

    def __init__(self, augment):
        self.augment = augment
        self.choices: list[Tensor] = []

    def __call__(self, images: Tensor) -> Tensor:
        choice = self.augment.draw(images.shape[0], images.device)
        self.choices.append(choice)
        return self.augment.apply(images, choice)

    def keys(self, index: Tensor) -> Tensor:
        """``index · choices + choice`` of the batch the teacher sees: the one augmented batch."""
        if len(self.choices) != 1 or len(self.choices[0]) != len(index):
            raise RuntimeError("the teacher cache needs a batch augmented once, image by image, as "
                               f"Method.prepare_batch does; this step augmented {len(self.choices)} time(s)")
        return index * self.augment.choices + self.choices[0]


def open_cache(root: str | Path | None, teacher_name: str, teacher: nn.Module, data, inputs,
               writer: bool = True, name: str = "run") -> TeacherCache:
    """The cache for this teacher and training set under ``root``, made or read (UserError when
    the dataset's augmentation cannot be replayed, or the folder holds another cache)."""
    augment, train = data.augment, data.train
    if not isinstance(train, InMemoryLoader) or not hasattr(augment, "draw"):
        raise UserError("--teacher-cache needs a dataset held in memory whose augmentation is a numbered crop/flip "
                        "(shapes, cifar10, cifar100); this dataset crops its images in the loader's workers, which the "
                        "cache cannot replay: run without --teacher-cache")
    key = CacheKey(
        teacher=teacher_name, teacher_weights=weights_hash(teacher), data=images_hash(train.images, train.targets),
        input_size=int(data.input_size), mean=tuple(float(m) for m in data.mean), std=tuple(float(s) for s in data.std),
        augmentation=repr(augment), choices=int(augment.choices),
        precision="bf16-autocast" if inputs.amp and inputs.device.type == "cuda" else "float32",
        num_classes=int(data.num_classes), storage=_output_dtype(teacher, train, inputs),
    )
    row_bytes = key.num_classes * getattr(torch, key.storage).itemsize + 8
    table = storage_device(inputs.device, len(train.targets) * key.choices * row_bytes)
    return TeacherCache(root, key, table, writer=writer, name=name)


def _output_dtype(teacher: nn.Module, train: InMemoryLoader, inputs) -> str:
    """The dtype of the teacher's logits under the run's autocast: one forward of one image."""
    from .data.loaders import to_float

    with torch.no_grad(), inputs.autocast():
        return str(teacher(inputs(to_float(train.images[:1].to(inputs.device)))).dtype).removeprefix("torch.")


def storage_device(device: torch.device | str, bytes_at_most: int) -> torch.device:
    """Where the table lives: the training device when every possible row (each image under each
    choice: ``bytes_at_most``) fits in half of its free memory, else the CPU (lookups then cross
    to the host)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if bytes_at_most <= free // 2 else torch.device("cpu")
