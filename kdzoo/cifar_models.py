"""The CIFAR networks of the distillation literature, registered as timm models (``cifar_*``).

The CIFAR-100 table that CRD, DKD and most later papers quote trains the networks of
RepDistiller (github.com/HobbitLong/RepDistiller, ``models/``), which timm does not have:
ResNets with a 3-stage, 16-channel layout, WideResNets, BN-VGGs without FC layers, a
half-width MobileNetV2 and CIFAR ShuffleNets. This module rebuilds them (own code, same
architecture) and registers each under a ``cifar_`` name, so that after ``import kdzoo``
``timm.create_model("cifar_resnet32x4", num_classes=100)`` works and every kdzoo command
accepts them. See docs/cifar-models.md for the name mapping and parameter counts.

What is kept from the reference, and why:

* Parameter counts and stage shapes are exactly the reference's (tests/test_cifar_models.py
  checks all 22 networks against numbers measured by running the reference code).
* Module names follow the reference, so a RepDistiller ``state_dict`` (e.g. its published
  teacher checkpoints) loads into the ``cifar_*`` model with ``strict=True``.
* Each family is initialised as the reference initialises it (documented on each builder).
* ``feature_info`` lists the reference's feature list (``is_feat=True`` outputs, without the
  pooled vector): entry 0 is the stem, the others the stages. kdzoo drops the stem entry, so
  the taps ``stage1``…``stageN`` are RepDistiller's ``feat[1]``…``feat[N]``, the tensors its
  FitNet/AT/CRD/… code distils.

What differs: the head pools with a global average (``AdaptiveAvgPool2d(1)``) where the
reference pools with a fixed window (8, 4 or 2 pixels). At 32×32 inputs the two are the same
operation; at other sizes the global average still gives one vector per image. The VGGs
always have the 32-px layout (the reference adds a pool for 64-px inputs). None of these
networks has pretrained weights on the timm hub (``pretrained=True`` raises).
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from functools import partial

import torch
from timm.models import register_model
from torch import Tensor, nn

REFERENCE = "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403"
DEFAULT_CLASSES = 100  # CIFAR-100, the dataset these networks are quoted on

# what timm.create_model always hands an entrypoint; these networks have no pretrained configs
_TIMM_PLUMBING = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


# ------------------------------------------------------------------------------------------
# the timm interface, shared by every family


class CifarNet(nn.Module, metaclass=abc.ABCMeta):
    """timm's classifier interface on top of a family's ``forward_features``.

    A family sets ``num_features``, ``feature_info`` and a classifier at ``classifier_path``
    (a module path, because MobileNetV2 keeps its Linear inside a Sequential). ``forward_head``
    is global average pooling + the classifier; ``pre_logits=True`` returns the pooled vector
    (kdzoo's ``embedding`` tap is the classifier's input, the same vector).
    """

    classifier_path = "fc"

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.feature_info: list[dict] = []
        self.num_features = 0

    def _head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @abc.abstractmethod
    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, unpooled (each family builds its own)."""

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.classifier_path)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier (PyTorch's default Linear init, as timm does); 0 classes: none."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"{type(self).__name__} pools by average only, not {global_pool!r}")
        parent, _, name = self.classifier_path.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, name, self._head(num_classes))
        self.num_classes = num_classes

    def _stage(self, module: str, num_chs: int, reduction: int) -> None:
        self.feature_info.append({"num_chs": num_chs, "reduction": reduction, "module": module})


def _init_like_reference(model: nn.Module, linear_std: float | None = None, linear_zero_bias: bool = False) -> None:
    """The reference's initialisation, which every family except ShuffleNet shares for convs:

    conv weights ~ N(0, 2 / (k·k·out_channels)), i.e. Kaiming-normal in ``fan_out`` mode for
    ReLU (the reference writes it out by hand in WRN/VGG/MobileNetV2 and calls
    ``kaiming_normal_(mode="fan_out")`` in the ResNets: the same distribution); conv biases 0;
    BN weight 1, bias 0 (PyTorch's default, restated by the reference). The classifier differs
    by family: ``linear_std`` draws its weight from N(0, std) with zero bias (VGG,
    MobileNetV2), ``linear_zero_bias`` keeps PyTorch's weight init but zeroes the bias (WRN),
    neither keeps PyTorch's Linear init (the ResNets). No residual BN starts at zero: the
    reference never zero-initialises a last BN.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if linear_std is not None or linear_zero_bias:
                nn.init.zeros_(m.bias)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's shuffle: channel ``g·n + i`` moves to ``i·groups + g`` (groups interleave)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


# ------------------------------------------------------------------------------------------
# ResNets: resnet8…110, resnet8x4/32x4 (3 stages, basic blocks) and ResNet50 (4 stages)


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, plus the shortcut, then ReLU (post-activation, He et al. 2016a).

    The shortcut is a projection (1×1 conv + BN: He et al.'s "option B") wherever the shape
    changes, identity elsewhere. The original CIFAR ResNets used option A (parameter-free
    zero-padding), so these resnet20…110 have a few more parameters than the paper's — the
    RepDistiller numbers everyone quotes are for this variant.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        project = stride != 1 or cin != cout
        self.downsample = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if project else nn.Identity()
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.downsample(x))


class Bottleneck(nn.Module):
    """1×1 reduce - 3×3 (carries the stride) - 1×1 expand ×4, each with BN, ReLU after the first
    two and after the sum; projection shortcut where the shape changes (ResNet50 only)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, cout, 1)
        self.act = nn.ReLU(inplace=True)
        project = stride != 1 or cin != cout
        self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if project else nn.Identity()
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        return self.act3(self.bn3(self.conv3(out)) + self.shortcut(x))


class CifarResNet(CifarNet):
    """3×3 stride-1 stem conv-BN-ReLU (no max-pool: 32-px inputs), then stages of residual
    blocks; the first stage keeps the resolution, each later one halves it with a stride-2
    first block. Global average pool, Linear.

    Two reference layouts share this class: ``resnet.py`` (basic blocks, 3 stages of
    16/32/64 channels ×1 or ×4, shortcut named ``downsample``, classifier ``fc``) and
    ``resnetv2.py`` (the kuangliu-style ResNet50: bottlenecks, 4 stages of 64…512 widths,
    shortcut named ``shortcut``, classifier ``linear``); the names keep state_dicts loadable.
    """

    def __init__(self, block: str, depths, widths, stem: int, num_classes: int = DEFAULT_CLASSES, in_chans: int = 3):
        super().__init__(num_classes)
        self.conv1, self.bn1 = _conv_bn(in_chans, stem, 3)
        self.act1 = nn.ReLU(inplace=True)
        self._stage("act1", stem, 1)
        cin, reduction = stem, 1
        for i, (depth, width) in enumerate(zip(depths, widths), start=1):
            stride = 1 if i == 1 else 2
            reduction *= stride
            blocks = []
            for j in range(depth):
                if block == "basic":
                    blocks.append(BasicBlock(cin, width, stride if j == 0 else 1))
                    cin = width
                else:
                    blocks.append(Bottleneck(cin, width, stride if j == 0 else 1))
                    cin = width * Bottleneck.expansion
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            self._stage(f"layer{i}", cin, reduction)
        self.num_stages = len(depths)
        self.num_features = cin
        self.classifier_path = "fc" if block == "basic" else "linear"
        setattr(self, self.classifier_path, self._head(num_classes))
        _init_like_reference(self)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return x


def _cifar_resnet(depth: int, widths=(16, 32, 64), stem: int = 16, **kwargs) -> CifarResNet:
    """RepDistiller's ``resnet<depth>``: depth = 6n + 2 (stem + 3 stages of n two-conv blocks + fc)."""
    assert (depth - 2) % 6 == 0, depth
    n = (depth - 2) // 6
    return CifarResNet("basic", (n, n, n), widths, stem, **kwargs)


# ------------------------------------------------------------------------------------------
# WideResNets (Zagoruyko & Komodakis): wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3×3-BN-ReLU-conv3×3, added to the shortcut, no ReLU after.

    Where the width changes (always with the stage's stride here), the shortcut is a 1×1 conv
    *without BN* that reads the block's pre-activated input (BN-ReLU shared with the main
    path); elsewhere the shortcut is the raw input. No dropout (the reference's rate is 0).
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.convShortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        return out + (x if self.convShortcut is None else self.convShortcut(pre))


class WideResNet(CifarNet):
    """3×3 stem conv (no BN/ReLU: the first block pre-activates), 3 stages of (depth-4)/6 wide
    blocks at 16k/32k/64k channels, then the final BN-ReLU (part of ``forward_features``),
    global average pool, Linear. Stage taps are the blocks' raw sums, as in the reference.

    Init: Kaiming-normal (fan_out) convs, BN 1/0, Linear with PyTorch's weight init and a zero bias.
    """

    def __init__(self, depth: int, widen: int, num_classes: int = DEFAULT_CLASSES, in_chans: int = 3):
        super().__init__(num_classes)
        assert (depth - 4) % 6 == 0, depth
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self._stage("conv1", 16, 1)
        cin = 16
        for i, (width, stride) in enumerate(((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)), start=1):
            blocks = [WideBlock(cin if j == 0 else width, width, stride if j == 0 else 1) for j in range(n)]
            # ``block<i>.layer``: the reference's nesting, kept so its state_dicts load
            self.add_module(f"block{i}", nn.Sequential(OrderedDict(layer=nn.Sequential(*blocks))))
            self._stage(f"block{i}", width, stride * (self.feature_info[-1]["reduction"]))
            cin = width
        self.bn1 = nn.BatchNorm2d(cin)
        self.act = nn.ReLU(inplace=True)
        self.num_features = cin
        self.fc = self._head(num_classes)
        _init_like_reference(self, linear_zero_bias=True)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.act(self.bn1(x))


# ------------------------------------------------------------------------------------------
# VGG with BN: vgg8, vgg11, vgg13, vgg16, vgg19

VGG_LAYOUTS = {  # output channels of each 3×3 conv, per block (5 blocks)
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class CifarVGG(CifarNet):
    """Five blocks of conv3×3 (with bias) - BN - ReLU, 2×2 max-pools after the first three
    blocks only (32 → 4 px: blocks 4 and 5 both run at 4×4), global average pool, one Linear
    from 512 channels — no FC layers, unlike ImageNet VGG (and timm's ``vgg*_bn``).

    The reference also max-pools between blocks 4 and 5, but only for 64-px inputs; this
    version always has the 32-px layout. Init: Kaiming-normal (fan_out) convs with zero bias,
    BN 1/0, classifier N(0, 0.01) with zero bias.
    """

    classifier_path = "classifier"

    def __init__(self, depth: int, num_classes: int = DEFAULT_CLASSES, in_chans: int = 3):
        super().__init__(num_classes)
        cin, reduction = in_chans, 1
        for i, widths in enumerate(VGG_LAYOUTS[depth]):
            layers = []
            for width in widths:
                layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                cin = width
            self.add_module(f"block{i}", nn.Sequential(*layers))
            self._stage(f"block{i}", cin, reduction)
            if i < 3:
                self.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
                reduction *= 2
        self.num_features = cin
        self.classifier = self._head(num_classes)
        _init_like_reference(self, linear_std=0.01)

    def forward_features(self, x: Tensor) -> Tensor:
        for i in range(3):
            x = getattr(self, f"pool{i}")(getattr(self, f"block{i}")(x))
        return self.block4(self.block3(x))


# ------------------------------------------------------------------------------------------
# MobileNetV2 at width 0.5 (RepDistiller's ``mobile_half``, from the RCO paper)


class InvertedResidual(nn.Module):
    """1×1 expand (×t) - BN - ReLU - 3×3 depthwise - BN - ReLU - 1×1 project - BN (linear
    bottleneck); identity shortcut when stride 1 and the width is unchanged. The expansion
    conv is there even for t = 1 (timm and torchvision drop it), which the count includes."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *_conv_bn(cin, mid, 1), nn.ReLU(inplace=True),
            *_conv_bn(mid, mid, 3, stride, groups=mid), nn.ReLU(inplace=True),
            *_conv_bn(mid, cout, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class CifarMobileNetV2(CifarNet):
    """MobileNetV2 with expansion 6 at width 0.5: stem conv3×3 *stride 2* (the reference keeps
    it, so 32 px → 16 px), seven stages (t, c, n, s) = (1,16,1,1) (6,24,2,1) (6,32,3,2)
    (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1) with channels halved (floor), a 1×1 conv to
    1280 channels (not halved below width 1), global average pool (2×2 at 32 px), Linear.

    Stage taps are the reference's features: after stages 2, 3, 5 and 7 (``blocks.1``,
    ``blocks.2``, ``blocks.4``, ``blocks.6``). Init: Kaiming-normal (fan_out) convs, BN 1/0,
    classifier N(0, 0.01) with zero bias.
    """

    classifier_path = "classifier.0"
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width: float = 0.5, num_classes: int = DEFAULT_CLASSES, in_chans: int = 3):
        super().__init__(num_classes)
        cin = int(32 * width)
        self.conv1 = nn.Sequential(*_conv_bn(in_chans, cin, 3, 2), nn.ReLU(inplace=True))
        self._stage("conv1", cin, 2)
        reduction, stages = 2, []
        for i, (t, c, n, s) in enumerate(self.SETTING):
            cout, reduction = int(c * width), reduction * s
            stages.append(nn.Sequential(*[InvertedResidual(cin if j == 0 else cout, cout, s if j == 0 else 1, t)
                                          for j in range(n)]))
            cin = cout
            if i in (1, 2, 4, 6):
                self._stage(f"blocks.{i}", cout, reduction)
        self.blocks = nn.Sequential(*stages)
        self.num_features = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(*_conv_bn(cin, self.num_features, 1), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(self._head(num_classes))
        _init_like_reference(self, linear_std=0.01)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.conv2(self.blocks(self.conv1(x)))


# ------------------------------------------------------------------------------------------
# ShuffleNet V1 (g = 3) and V2 (1×), CIFAR versions


class ShuffleV1Unit(nn.Module):
    """Grouped 1×1 (to a quarter of the output) - BN - ReLU - shuffle - depthwise 3×3 - BN -
    ReLU - grouped 1×1 - BN, then ReLU of (sum with the input) or, when strided, of
    (concatenation with a 3×3 stride-2 average pool of the input). The ReLU after the
    depthwise conv is the reference's (the paper has none there; outputs differ without it).
    The first unit of the network reads the 24-channel stem with an ungrouped 1×1 (24 is not
    worth splitting), as the paper does."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        mid = cout // 4
        first_groups = 1 if cin == 24 else groups
        self.stride, self.first_groups = stride, first_groups
        self.conv1, self.bn1 = _conv_bn(cin, mid, 1, groups=first_groups)
        self.conv2, self.bn2 = _conv_bn(mid, mid, 3, stride, groups=mid)
        self.conv3, self.bn3 = _conv_bn(mid, cout, 1, groups=groups)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(self.act(self.bn1(self.conv1(x))), self.first_groups)
        out = self.bn3(self.conv3(self.act(self.bn2(self.conv2(out)))))
        out = torch.cat([out, self.shortcut(x)], 1) if self.stride == 2 else out + x
        return torch.relu(out)


class CifarShuffleNetV1(CifarNet):
    """1×1 stem conv (3 → 24) - BN - ReLU at full resolution (no stride, no pool), three
    stages of 4/8/4 units ending at 240/480/960 channels, each starting with a stride-2
    concatenating unit (32 → 16 → 8 → 4 px), global average pool, Linear.

    Init: PyTorch's defaults — the reference initialises nothing in its ShuffleNets.
    """

    classifier_path = "linear"

    def __init__(self, widths=(240, 480, 960), depths=(4, 8, 4), groups: int = 3,
                 num_classes: int = DEFAULT_CLASSES, in_chans: int = 3):
        super().__init__(num_classes)
        self.conv1, self.bn1 = _conv_bn(in_chans, 24, 1)
        self.act1 = nn.ReLU(inplace=True)
        self._stage("act1", 24, 1)
        cin = 24
        for i, (width, depth) in enumerate(zip(widths, depths), start=1):
            # the strided unit concatenates its input, so it only produces width - cin channels
            units = [ShuffleV1Unit(cin, width - cin, 2, groups)] + [ShuffleV1Unit(width, width, 1, groups)
                                                                    for _ in range(depth - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*units))
            self._stage(f"layer{i}", width, 2 ** i)
            cin = width
        self.num_features = cin
        self.linear = self._head(num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


class ShuffleV2Unit(nn.Module):
    """The V2 basic unit: split the channels in half, keep one half, run the other through
    1×1-BN-ReLU - depthwise 3×3-BN - 1×1-BN-ReLU, concatenate, shuffle (2 groups)."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1, self.bn1 = _conv_bn(half, half, 1)
        self.conv2, self.bn2 = _conv_bn(half, half, 3, groups=half)
        self.conv3, self.bn3 = _conv_bn(half, half, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        keep, x = x.chunk(2, dim=1)
        x = self.act(self.bn3(self.conv3(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))))
        return channel_shuffle(torch.cat([keep, x], 1), 2)


class ShuffleV2Down(nn.Module):
    """The V2 stride-2 unit: both branches see the whole input; left: depthwise 3×3 s2-BN -
    1×1-BN-ReLU, right: 1×1-BN-ReLU - depthwise 3×3 s2-BN - 1×1-BN-ReLU; each gives half of
    the output channels; concatenate, shuffle (2 groups)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        half = cout // 2
        self.conv1, self.bn1 = _conv_bn(cin, cin, 3, 2, groups=cin)
        self.conv2, self.bn2 = _conv_bn(cin, half, 1)
        self.conv3, self.bn3 = _conv_bn(cin, half, 1)
        self.conv4, self.bn4 = _conv_bn(half, half, 3, 2, groups=half)
        self.conv5, self.bn5 = _conv_bn(half, half, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        left = self.act(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.act(self.bn3(self.conv3(x)))
        right = self.act(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class CifarShuffleNetV2(CifarNet):
    """1×1 stem conv (3 → 24) - BN - ReLU at full resolution, three stages of one stride-2 unit
    plus 3/7/3 basic units at 116/232/464 channels (the 1× setting), a 1×1 conv to 1024 -
    BN - ReLU (part of ``forward_features``), global average pool, Linear.

    Init: PyTorch's defaults — the reference initialises nothing in its ShuffleNets.
    """

    classifier_path = "linear"

    def __init__(self, widths=(116, 232, 464), depths=(3, 7, 3), head: int = 1024,
                 num_classes: int = DEFAULT_CLASSES, in_chans: int = 3):
        super().__init__(num_classes)
        self.conv1, self.bn1 = _conv_bn(in_chans, 24, 1)
        self.act1 = nn.ReLU(inplace=True)
        self._stage("act1", 24, 1)
        cin = 24
        for i, (width, depth) in enumerate(zip(widths, depths), start=1):
            self.add_module(f"layer{i}", nn.Sequential(ShuffleV2Down(cin, width), *[ShuffleV2Unit(width) for _ in range(depth)]))
            self._stage(f"layer{i}", width, 2 ** i)
            cin = width
        self.conv2, self.bn2 = _conv_bn(cin, head, 1)
        self.act2 = nn.ReLU(inplace=True)
        self.num_features = head
        self.linear = self._head(num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.act1(self.bn1(self.conv1(x))))))
        return self.act2(self.bn2(self.conv2(x)))


# ------------------------------------------------------------------------------------------
# timm entrypoints


def _build(name: str, factory, pretrained: bool, kwargs: dict) -> CifarNet:
    if pretrained:
        raise RuntimeError(f"{name} has no pretrained weights in timm; train it, or load a checkpoint")
    for key in _TIMM_PLUMBING:
        kwargs.pop(key, None)
    model = factory(**kwargs)
    model.pretrained_cfg = model.default_cfg = {
        "architecture": name, "num_classes": model.num_classes, "input_size": (3, 32, 32),
        "classifier": model.classifier_path, "source": REFERENCE,
    }
    return model


def _entrypoint(name: str, factory, reference_name: str) -> None:
    def entrypoint(pretrained: bool = False, **kwargs) -> CifarNet:
        return _build(name, factory, pretrained, kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"RepDistiller's ``{reference_name}`` ({REFERENCE}), CIFAR layout."
    globals()[name] = register_model(entrypoint)  # a module attribute too: register_model lists it in __all__


# kdzoo name -> (builder, RepDistiller model_dict name)
CIFAR_MODELS = {
    **{f"cifar_resnet{d}": (partial(_cifar_resnet, d), f"resnet{d}") for d in (8, 14, 20, 32, 44, 56, 110)},
    **{f"cifar_resnet{d}x4": (partial(_cifar_resnet, d, (64, 128, 256), 32), f"resnet{d}x4") for d in (8, 32)},
    **{f"cifar_wrn_{d}_{k}": (partial(WideResNet, d, k), f"wrn_{d}_{k}") for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{f"cifar_vgg{d}": (partial(CifarVGG, d), f"vgg{d}") for d in (8, 11, 13, 16, 19)},
    "cifar_resnet50": (partial(CifarResNet, "bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), 64), "ResNet50"),
    "cifar_mobilenetv2": (partial(CifarMobileNetV2, 0.5), "MobileNetV2"),
    "cifar_shufflenet_v1": (CifarShuffleNetV1, "ShuffleV1"),
    "cifar_shufflenet_v2": (CifarShuffleNetV2, "ShuffleV2"),
}

__all__ = ["CIFAR_MODELS", "REFERENCE", "CifarNet", "channel_shuffle"]

for _name, (_factory, _reference) in CIFAR_MODELS.items():
    _entrypoint(_name, _factory, _reference)
