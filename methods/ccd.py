"""Li, Shao et al., ACCV 2022, "What Role Does Data Augmentation Play in Knowledge Distillation?".

Both methods train on Joint Data Augmentation (JDA) pairs: every image appears twice in the
batch, once with the standard crop and flip and once after a fixed AutoAugment sequence
(:mod:`kdzoo.data.jda`), interleaved ``[orig₀, aug₀, orig₁, aug₁, …]``. Teacher and student both see
all 2B images.

``ccd`` (Cosine Confidence Distillation) weights each augmented sample's KL term by how well
the teacher's logits survive the augmentation, ``c_j = cos(z_t(orig_j), z_t(aug_j)) + 1``:

    S = ½ [ KL_b(originals) + mean_j c_j · KL_j(augmented j) ]
    L = kd_weight · [ α · CE(all 2B) + (1 − α) · τ² · S ]

``kd_jda`` is the paper's baseline on the same pairs: plain KD with one KL over all 2B samples,
``L = kd_weight · [ α · CE + (1 − α) · τ² · KL_b ]``. Defaults (τ = 4, α = 0.5, kd_weight = 2)
are the reference code's CIFAR-100 script defaults, so L = CE + τ² · S.

The code carries τ² inside each KL (:func:`kdzoo.losses.softened_kl` is τ²·KL), so it computes
τ² · S = ½ [ τ²·KL_b + mean_j c_j · τ²·KL_j ] directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from kdzoo.data.jda import JDA, paired_views
from kdzoo.errors import UserError
from kdzoo.losses import cross_entropy, softened_kl
from kdzoo.method import Batch, Method, StepOutputs
from kdzoo.registry import register_method

PolicyName = Literal["cifar100", "cifar10", "imagenet"]


class _JointAugmentation(Method):
    """Shared by ``ccd`` and ``kd_jda``: builds the paired JDA batch."""

    needs_teacher = True
    logits_only_teacher = True
    tasks = ("cls",)
    # image folders crop in the loader's workers: ask for two separate crops of each image, one
    # per view, as the reference crops each view on its own (in-memory data crop in `augment`)
    loader_views = 2
    # The reference's policy per dataset (CIFAR-100 is the Config default). ImageNet's is used
    # for image folders (ImageNet-style photographs at 224 px); shapes keeps CIFAR-100's, the
    # closest in image size and content density.
    dataset_defaults = {"cifar10": {"policy": "cifar10"}, "imagefolder": {"policy": "imagenet"}}

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        self.check_config(positive=("temperature",), non_negative=("kd_weight",), unit=("p", "alpha_ce"))
        try:
            self.jda = JDA(c.policy, p=c.p)
        except ValueError as e:
            raise UserError(f"method {self.name!r}: {e}") from None

    def prepare_batch(self, batch: Batch, augment) -> Batch:
        views, targets = paired_views(batch.images, batch.targets, augment, self.jda)
        return Batch(views, targets, batch.index.repeat_interleave(2))  # [orig₀, aug₀, …]: both views of image i

    def _pairs(self, out: StepOutputs) -> tuple[Tensor, Tensor]:
        student = out.student.logits.float()
        teacher = self.teacher_output(out).logits.float().detach()
        if student.shape[0] % 2:
            raise RuntimeError(
                f"method {self.name!r} expects the interleaved JDA batch [orig, aug, …] of even size, "
                f"got {student.shape[0]} samples"
            )
        return student, teacher

    def _weighted(self, ce: Tensor, soft: Tensor) -> dict[str, Tensor]:
        """kd_weight · [α · CE + (1 − α) · soft], with ``soft`` = τ²·S (ccd) or τ²·KL_b (kd_jda)."""
        c = self.config
        return {
            "ce": c.kd_weight * c.alpha_ce * ce,
            "kd": c.kd_weight * (1 - c.alpha_ce) * soft,
        }


@register_method("ccd")
class CCD(_JointAugmentation):
    summary = "Cosine Confidence Distillation on JDA pairs: augmented KL weighted by teacher cos(orig, aug) + 1"

    @dataclass
    class Config:
        temperature: float = 4.0
        alpha_ce: float = 0.5  # share of cross-entropy; the soft term gets 1 − alpha_ce
        kd_weight: float = 2.0  # overall multiplier of the whole loss (the reference's --kd_weight)
        policy: PolicyName = "cifar100"  # JDA policy for the augmented view
        p: float | None = None  # override of the policy's firing probability (cifar100 0.3, cifar10 0.5, imagenet 0.2)

    def loss(self, out: StepOutputs):
        s, t = self._pairs(out)
        tau = self.config.temperature
        original = softened_kl(s[0::2], t[0::2], tau)
        confidence = F.cosine_similarity(t[0::2], t[1::2], dim=1) + 1  # (B,), in [0, 2]
        augmented = (confidence * softened_kl(s[1::2], t[1::2], tau, reduction="none")).mean()
        return self._weighted(cross_entropy(s, out.targets), (original + augmented) / 2)


@register_method("kd_jda")
class KDJDA(_JointAugmentation):
    summary = "KD on JDA pairs (CCD paper's baseline): unweighted KL over originals and augmented views"

    Config = CCD.Config  # the same hyperparameters; only the loss differs

    def loss(self, out: StepOutputs):
        s, t = self._pairs(out)
        return self._weighted(cross_entropy(s, out.targets), softened_kl(s, t, self.config.temperature))

