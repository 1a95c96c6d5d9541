"""CRD: Contrastive Representation Distillation (Tian, Krishnan, Isola, ICLR 2020).

Instead of matching the teacher's embedding coordinate by coordinate, the student learns to tell
the teacher's embedding of *its own* image apart from the embeddings of many other images: a
contrastive bound on the mutual information between the two representations, which carries the
teacher's structure (which images it finds alike) rather than its exact coordinates. Thousands of
negatives per sample come from memory banks of every training image's past embeddings, so the
batch size does not limit them.

    v_s = ‖W_s f_s + b_s‖₂⁻¹ (W_s f_s + b_s),  v_t likewise    linear embeds to 128-d (both trained), L2-normalised
    M_s, M_t ∈ R^{N×128}                              one row per training image (N = training-set size)
    i_0 = the sample's own index; i_1..i_K            K = 16384 negatives (below)
    h_t(i, k) = exp(⟨M_t[i_k], v_s⟩ / τ) / Z_s        student as anchor, against the teacher's bank
    h_s(i, k) = exp(⟨M_s[i_k], v_t⟩ / τ) / Z_t        teacher as anchor, against the student's bank
    NCE(h)    = −(1/B) Σ_i [ log( h_i0 / (h_i0 + K/N + ε) ) + Σ_{k≥1} log( (K/N) / (h_ik + K/N + ε) ) ]
    L_crd     = NCE(h_t) + NCE(h_s)                    ε = 1e-7
    L         = ce_weight · CE + crd_weight · L_crd (+ kd_weight · τ_kd² · KL)
    after the loss:  M[i_0] ← normalise(m · M[i_0] + (1 − m) · v)   for both banks, m = 0.5

- Z: the normalisation constant of the non-normalised softmax, estimated once, on the first
  training batch, as mean(exp-scores over its B·(K+1) entries) · N for each direction, stored in
  float32 (the official code keeps it in a float32 buffer and then divides by that value), and
  kept for the whole run. It is method state: the ``z`` buffer, −1 until set, saved in last.pt.
  Under DDP the first batch is the global one: the per-rank means are averaged over ranks.
- Negatives ("exact" mode of RepDistiller's CIFAR-100 loader): K indices of images of *other*
  classes, drawn without replacement, or with replacement when K exceeds their number (both as
  ``np.random.choice`` in ``CIFAR100InstanceSample``); with replacement on ImageNet
  (``ImageFolderSample``). ``negatives="any"`` draws uniformly from every image, with replacement
  (the memory's own ``AliasMethod`` draw, used when no indices are given). They come from a
  generator of the method's, seeded once per run; its state is saved with the banks, so a resumed
  run draws what an uninterrupted one would. Under DDP every rank draws the global batch's
  negatives from the same state and keeps its rows, so each image gets the negatives it would get
  in one process.
- Banks: initialised uniform in ±1/√(128/3) as in the official code, from a seed rank 0 draws,
  and updated with the embeddings and indices of the *global* batch (gathered over ranks), so
  every rank holds the same banks without DDP broadcasting them each step.
- Scores are read from bank rows copied before the update (``index_select``), as the official code
  does; the banks never receive gradients.

Defaults: RepDistiller's CIFAR-100 setting ``-r 1 -a 0 -b 0.8`` with feat_dim 128, nce_k 16384,
nce_t 0.07, nce_m 0.5, mode "exact"; ``--set kd_weight=1`` is its "CRD+KD" row (``-a 1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdzoo import distributed
from kdzoo.errors import UserError
from kdzoo.losses import cross_entropy, softened_kl
from kdzoo.method import Method, StepOutputs, Taps
from kdzoo.registry import register_method

NCE_EPS = 1e-7


def l2_normalize(x: Tensor) -> Tensor:
    """x / ‖x‖₂ per row, without a floor (the official ``Normalize``)."""
    return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


def nce_loss(scores: Tensor, n_data: int) -> Tensor:
    """The NCE objective on normalised scores (B, 1+K), the positive in column 0; noise 1/N."""
    b, k = scores.shape[0], scores.shape[1] - 1
    noise = k / float(n_data)
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + NCE_EPS))
    log_d0 = torch.log(noise / (neg + noise + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / b


def bank_scores(bank: Tensor, idx: Tensor, anchor: Tensor, tau: float) -> Tensor:
    """exp(⟨bank[idx[b, k]], anchor[b]⟩ / τ), (B, 1+K), from rows copied out of the bank."""
    rows = torch.index_select(bank, 0, idx.reshape(-1)).detach().view(*idx.shape, bank.shape[1])
    return torch.exp(torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / tau)


def momentum_update(bank: Tensor, index: Tensor, values: Tensor, momentum: float) -> None:
    """bank[index] ← normalise(m · bank[index] + (1 − m) · values), in place."""
    rows = torch.index_select(bank, 0, index) * momentum + values * (1 - momentum)
    bank.index_copy_(0, index, l2_normalize(rows))


def draw_negatives(rows: int, k: int, n_data: int, generator: torch.Generator, labels: Tensor | None = None,
                   by_class: Tensor | None = None, class_start: Tensor | None = None,
                   replacement: bool = False) -> Tensor:
    """(rows, K) dataset indices of negatives.

    ``labels`` None: uniform over all N images, with replacement. Otherwise uniform over the
    images of other classes than each row's ``labels``: ``by_class`` lists the dataset indices
    sorted by class and ``class_start[c]`` is where class c begins in it, so a row's candidates
    are that list without one contiguous block. Without replacement, unless ``replacement`` or K
    exceeds the row's candidates (then with, as ``np.random.choice`` is called officially).
    """
    device = generator.device
    if labels is None:
        return torch.randint(0, n_data, (rows, k), device=device, generator=generator)
    lo, hi = class_start[labels], class_start[labels + 1]
    own = hi - lo
    candidates = n_data - own
    with_replacement = (candidates < k) | replacement
    # with replacement: j uniform in [0, candidates) (float64, so every j is equally likely), past the own block
    j = (torch.rand(rows, k, dtype=torch.float64, device=device, generator=generator) * candidates[:, None]).long()
    j = torch.minimum(j, (candidates - 1)[:, None])
    picked = j + (j >= lo[:, None]) * own[:, None]
    if k <= n_data and not replacement:  # (no host sync: rows that need replacement take the draw above)
        # without replacement: the K smallest of random keys, the own block keyed out
        keys = torch.rand(rows, n_data, device=device, generator=generator)
        position = torch.arange(n_data, device=device)
        keys.masked_fill_((position >= lo[:, None]) & (position < hi[:, None]), 2.0)
        subset = keys.topk(k, dim=1, largest=False, sorted=False).indices
        picked = torch.where(with_replacement[:, None], picked, subset)
    return by_class[picked]


def _gather_rows(*tensors: Tensor) -> tuple[list[Tensor], int, int]:
    """Every rank's ``tensors`` concatenated in rank order (the global batch), with this rank and
    the world size. Each rank holds an equal share of a training batch (kdzoo's sharding)."""
    if not distributed.active():
        return list(tensors), 0, 1
    world = dist.get_world_size()
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return out, dist.get_rank(), world


@register_method("crd")
class CRD(Method):
    summary = "Contrastive Representation Distillation: NCE against 16384 memory-bank negatives, both directions"
    needs_teacher = True
    tasks = ("cls",)
    taps = Taps(student=["embedding"], teacher=["embedding"])
    # RepDistiller's ImageNet loader (dataset/imagenet.py, ImageFolderSample) draws the negatives
    # with replacement; everything else is the CIFAR-100 setting (also torchdistill's ImageNet config).
    dataset_defaults = {"imagefolder": {"sample_with_replacement": True}}

    @dataclass
    class Config:
        crd_weight: float = 0.8        # β (RepDistiller -b 0.8)
        ce_weight: float = 1.0         # γ (-r 1)
        kd_weight: float = 0.0         # α (-a 0); 1 = the "CRD+KD" row
        temperature: float = 4.0       # τ of the KD term (--kd_T 4)
        feat_dim: int = 128            # embedding width (--feat_dim)
        nce_k: int = 16384             # negatives per sample (--nce_k)
        nce_t: float = 0.07            # τ of the contrast (--nce_t)
        nce_m: float = 0.5             # momentum of the bank update (--nce_m)
        negatives: str = "other_class"  # "other_class" (--mode exact) or "any" (uniform over all images)
        sample_with_replacement: bool = False  # draw other-class negatives with replacement (ImageNet loader)

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        self.check_config(positive=("temperature", "feat_dim", "nce_k", "nce_t"), unit=("nce_m",),
                          non_negative=("crd_weight", "ce_weight", "kd_weight"))
        if c.negatives not in ("other_class", "any"):
            raise UserError(f"method 'crd': negatives must be 'other_class' or 'any', got {c.negatives!r}")
        self.n_data = 0
        self.seed = 0
        self.buffers_kept_in_sync: tuple[str, ...] = ()
        self._generator: torch.Generator | None = None
        self._saved_rng: tuple[str, Tensor] | None = None
        self._z_set: bool | None = None  # whether z holds Z (cached so that steps need no host sync)

    def setup(self, student, teacher) -> None:
        c = self.config
        if teacher is None:
            raise UserError("method 'crd' needs a teacher: add --teacher MODEL")
        if student.train_size is None:
            raise UserError("method 'crd' keeps a memory bank with one row per training image and needs the "
                            "training-set size; it runs only inside a training run")
        n = self.n_data = int(student.train_size)
        labels = student.train_labels
        if c.negatives == "other_class":
            if labels is None:
                raise UserError("method 'crd' draws its negatives from the other classes, but this dataset does not "
                                "list its labels; pass --set negatives=any to draw them from every image")
            counts = torch.bincount(labels)
            if int(counts.max()) == n:
                raise UserError("method 'crd': every training image has the same class, so there are no other-class "
                                "negatives; pass --set negatives=any")
            self.register_buffer("_labels", labels.clone(), persistent=False)
            self.register_buffer("_by_class", torch.argsort(labels, stable=True), persistent=False)
            self.register_buffer("_class_start", torch.cat([counts.new_zeros(1), counts.cumsum(0)]), persistent=False)
        self.embed_s = nn.Linear(student.embedding_dim, c.feat_dim)
        self.embed_t = nn.Linear(teacher.embedding_dim, c.feat_dim)
        # one seed for the banks and the negatives, the same on every rank
        self.seed = distributed.broadcast(int(torch.randint(0, 2**62, ()).item()))
        g = torch.Generator().manual_seed(self.seed)
        stdv = 1.0 / math.sqrt(c.feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(n, c.feat_dim, generator=g).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_teacher", torch.rand(n, c.feat_dim, generator=g).mul_(2 * stdv).add_(-stdv))
        # Z of the student-anchored scores (official Z_v1) and of the teacher-anchored ones (Z_v2)
        self.register_buffer("z", torch.full((2,), -1.0))
        self.buffers_kept_in_sync = tuple(name for name, _ in self.named_buffers())
        self._generator, self._saved_rng, self._z_set = None, None, None

    # -- the negatives' generator: method state -------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            g = torch.Generator(device=device)
            if self._saved_rng is not None and self._saved_rng[0] == device.type:
                g.set_state(self._saved_rng[1].cpu())
            else:  # a fresh run (or one resumed on another kind of device: a new stream)
                g.manual_seed(self.seed + (0 if self._saved_rng is None else 1))
            self._generator, self._saved_rng = g, None
        return self._generator

    def get_extra_state(self):
        if self._generator is not None:
            rng = (self._generator.device.type, self._generator.get_state())
        else:
            rng = self._saved_rng
        return {"seed": self.seed, "rng_device": None if rng is None else rng[0],
                "rng_state": None if rng is None else rng[1]}

    def set_extra_state(self, state):
        self.seed = int(state["seed"])
        self._generator, self._z_set = None, None
        self._saved_rng = None if state["rng_state"] is None else (state["rng_device"], state["rng_state"])

    # -- the loss -------------------------------------------------------------------------------
    def embed(self, out: StepOutputs) -> tuple[Tensor, Tensor]:
        """(v_s, v_t): the L2-normalised embeddings, float32."""
        teacher = self.teacher_output(out)
        v_s = l2_normalize(self.embed_s(out.student.embedding.float().flatten(1)))
        v_t = l2_normalize(self.embed_t(teacher.embedding.detach().float().flatten(1)))
        return v_s, v_t

    def contrast(self, v_s: Tensor, v_t: Tensor, index: Tensor, negatives: Tensor | None = None) -> Tensor:
        """L_crd for this rank's rows; in training, sets Z once and updates both banks.

        ``negatives`` (B, K): fixed negative indices (tests); None draws them.
        """
        c = self.config
        (index_all, vs_all, vt_all), rank, world = _gather_rows(index, v_s.detach(), v_t.detach())
        b = len(index)
        if negatives is None:
            g = self.generator(self.memory_student.device)
            labels = self._labels[index_all] if c.negatives == "other_class" else None
            negatives = draw_negatives(len(index_all), c.nce_k, self.n_data, g, labels,
                                       getattr(self, "_by_class", None), getattr(self, "_class_start", None),
                                       c.sample_with_replacement)[rank * b:(rank + 1) * b]
        idx = torch.cat([index[:, None], negatives], dim=1)
        s_scores = bank_scores(self.memory_teacher, idx, v_s, c.nce_t)  # student as anchor (official out_v1)
        t_scores = bank_scores(self.memory_student, idx, v_t, c.nce_t)  # teacher as anchor (out_v2)
        if self._z_set is None:
            self._z_set = bool(self.z[0] >= 0)  # one host sync per run (and after a --resume)
        if self._z_set:
            z = self.z
        else:  # the first training batch sets Z: mean over its B·(K+1) scores, times N
            with torch.no_grad():
                means = torch.stack([s_scores.mean(), t_scores.mean()])
                if world > 1:
                    distributed.all_reduce_sum(means)
                    means = means / world
                z = (means * self.n_data).float()
                if self.training:
                    self.z.copy_(z)
                    self._z_set = True
        loss = nce_loss(s_scores / z[0], self.n_data) + nce_loss(t_scores / z[1], self.n_data)
        if self.training:
            with torch.no_grad():
                momentum_update(self.memory_student, index_all, vs_all, c.nce_m)
                momentum_update(self.memory_teacher, index_all, vt_all, c.nce_m)
        return loss

    def loss(self, out: StepOutputs):
        c = self.config
        if out.index is None:
            raise RuntimeError("method 'crd' needs each row's dataset index (out.index)")
        with torch.autocast(device_type=out.student.logits.device.type, enabled=False):
            v_s, v_t = self.embed(out)
            terms = {"ce": c.ce_weight * cross_entropy(out.student.logits.float(), out.targets),
                     "crd": c.crd_weight * self.contrast(v_s, v_t, out.index)}
            if c.kd_weight > 0:
                terms["kd"] = c.kd_weight * softened_kl(out.student.logits.float(),
                                                        self.teacher_output(out).logits.detach().float(), c.temperature)
        return terms
