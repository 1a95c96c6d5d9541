"""A timm backbone with a light FPN decoder: the network of ``--task seg``.

Why FPN rather than DeepLabV3's ASPP: an FPN top-down path reads every stage, so it works on
any timm backbone whatever its strides (CNNs, ViT grids, the small-input stem), costs little
on a CPU, and gives a decoder map at the finest stage's resolution; ASPP needs a dilated,
output-stride-8 backbone that most timm families cannot be turned into.

    stage maps S_1..S_n ─▶ 1×1 laterals to D channels
    P_n = L_n;  P_i = L_i + up(P_{i+1})            (bilinear, to S_i's exact size)
    decoder = ReLU(BN(conv3×3(P_1)))               (D channels, S_1's resolution: the ``decoder`` tap)
    logits  = up(conv1×1(decoder)) to the input's H×W

Every resize goes to the size of the map it meets, so inputs that are not multiples of 32
(odd sizes included) work. Backbones with more than four stages (ViT blocks) feed the decoder
four evenly spaced ones, the last included.

Taps work as on a classifier: ``stages``/``stageK`` hook the backbone's stages (their module
paths start with ``backbone.``), ``decoder`` is the decoder map, ``logits`` the dense output.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError
from .hooks import stage_entries

DECODER_CHANNELS = 128
MAX_DECODER_STAGES = 4


def decoder_stage_indices(count: int) -> list[int]:
    """Which of ``count`` stages the decoder reads (0-based): all when there are at most four,
    else four evenly spaced ones ending with the last (ViT: blocks 3, 6, 9, 12 of 12)."""
    if count <= MAX_DECODER_STAGES:
        return list(range(count))
    return [count * k // MAX_DECODER_STAGES - 1 for k in range(1, MAX_DECODER_STAGES + 1)]


class FPNDecoder(nn.Module):
    """FPN top-down path over stage maps (finest first) → one D-channel map at the finest size."""

    def __init__(self, in_channels: list[int], channels: int = DECODER_CHANNELS):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    def forward(self, stages: list[Tensor]) -> Tensor:
        merged = self.lateral[-1](stages[-1])
        for lateral, stage in zip(reversed(self.lateral[:-1]), reversed(stages[:-1])):
            merged = lateral(stage) + F.interpolate(merged, size=stage.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(merged)


class SegmentationModel(nn.Module):
    """``backbone`` (a timm model without its classifier) + ``decoder`` + per-pixel ``classifier``.

    It carries a ``feature_info`` whose module paths point into the backbone, so kdzoo's stage
    taps resolve on it exactly as on the bare timm model.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, input_size: int, channels: int = DECODER_CHANNELS):
        super().__init__()
        if not hasattr(backbone, "forward_intermediates"):
            raise UserError(
                f"{type(backbone).__name__} cannot be a segmentation backbone: timm gives it no forward_intermediates; "
                "pick another family (resnet*, convnext*, efficientnet*, vit_* …)"
            )
        entries = stage_entries(backbone)
        first = len(backbone.feature_info) - len(entries)  # timm's index of stage1 (after the stem entry)
        self.stage_indices = [first + i for i in decoder_stage_indices(len(entries))]
        # every entry, the stem's included, so that stage_entries() drops the same one here
        self.feature_info = [{**dict(e), "module": f"backbone.{e['module']}"} for e in backbone.feature_info]
        # drop what follows the last stage (classifier, final norm): unused parameters would stall DDP
        backbone.prune_intermediate_layers(self.stage_indices, prune_head=True, prune_norm=True)
        self.backbone = backbone
        # what kdzoo.hooks.as_feature_map reads to turn tapped stage outputs (ViT tokens, NHWC) into maps
        self.num_prefix_tokens = getattr(backbone, "num_prefix_tokens", 0)
        self.output_fmt = getattr(backbone, "output_fmt", "NCHW")
        channels_in = [entries[i - first]["num_chs"] for i in self.stage_indices]
        self.decoder = FPNDecoder(channels_in, channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.num_classes = num_classes

    def stage_maps(self, x: Tensor) -> list[Tensor]:
        """The stages the decoder reads, as (B, C, H, W) maps (timm's default output format)."""
        return self.backbone.forward_intermediates(x, indices=self.stage_indices, intermediates_only=True)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.classifier(self.decoder(self.stage_maps(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
