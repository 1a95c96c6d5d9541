"""What every logit method shares: logit standardisation and the temperature of the step.

Not a method itself (the leading underscore keeps the registry from importing it as one).
"""

from __future__ import annotations

from torch import Tensor

from kdzoo.losses import standardize_logits
from kdzoo.method import Method


class LogitMethod(Method):
    """Base of the methods that read nothing of the teacher but its logits (kd, dkd, dist, …).

    Two things they share. **Logit standardisation** (Sun et al., CVPR 2024): a Config field
    ``logit_standardize`` that, when on, z-scores both networks' logits before a temperature
    softens them (:meth:`softenable`), with the companion weights the paper uses as
    ``switch_defaults``. **The temperature of the step** (:meth:`temperature`): the configured τ,
    unless a temperature curriculum (ctkd) sets ``step_temperature`` — a tensor that carries
    the curriculum's gradient — before calling the method's ``loss``.
    """

    needs_teacher = True
    logits_only_teacher = True

    def __init__(self, config=None):
        super().__init__(config)
        self.step_temperature: Tensor | None = None

    def softenable(self, logits: Tensor) -> Tensor:
        """The logits a temperature divides: as they are, or standardised when the switch is on."""
        return standardize_logits(logits) if getattr(self.config, "logit_standardize", False) else logits

    def temperature(self) -> float | Tensor:
        """τ for this step: the curriculum's when one is set, else ``config.temperature``."""
        return self.config.temperature if self.step_temperature is None else self.step_temperature
