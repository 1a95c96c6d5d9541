"""kdzoo — a pluggable knowledge-distillation method zoo for PyTorch and timm."""

__version__ = "0.1.0"

# cifar_models registers the cifar_* timm models; stem registers <resnet name>_smallstem (docs/export.md)
from . import cifar_models, losses, stem  # noqa: E402,F401
from .errors import UserError  # noqa: E402
from .losses import cross_entropy, kl_div  # noqa: E402
from .method import Batch, Method, NetOutputs, StepOutputs, Taps  # noqa: E402
from .registry import get_method, load_plugin, method_names, register_method  # noqa: E402

__all__ = [
    "Batch", "Method", "NetOutputs", "StepOutputs", "Taps", "UserError", "cross_entropy", "kl_div", "losses",
    "get_method", "load_plugin", "method_names", "register_method", "__version__",
]
