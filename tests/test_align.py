"""The shared alignment of student and teacher maps (kdzoo/align.py)."""

import pytest
import torch

from kdzoo.align import ChannelProjection, to_common_grid


def _cell_means(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average pooling written as loops over the target cells (an integer factor), float64."""
    b, c, h, w = x.shape
    f = h // size
    out = torch.zeros(b, c, size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            out[:, :, i, j] = x[:, :, i * f:(i + 1) * f, j * f:(j + 1) * f].double().mean(dim=(2, 3))
    return out


def test_a_larger_map_is_average_pooled_onto_the_smaller_grid():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 5, 4, 4, dtype=torch.float64)
    s, t = to_common_grid(student, teacher, grid="teacher")
    torch.testing.assert_close(s, _cell_means(student, 4), rtol=1e-5, atol=1e-7)
    assert t is teacher
    s2, t2 = to_common_grid(student, teacher, grid="smaller")
    torch.testing.assert_close(s2, s)
    s3, t3 = to_common_grid(student, teacher, grid="student")
    assert s3 is student and t3.shape == (2, 5, 8, 8)
    # growing is bilinear: a constant map stays constant
    flat = torch.full((1, 1, 2, 2), 3.0)
    assert torch.allclose(to_common_grid(torch.zeros(1, 1, 6, 6), flat)[1], torch.full((1, 1, 6, 6), 3.0))


def test_an_unknown_grid_is_refused():
    with pytest.raises(ValueError, match="grid must be"):
        to_common_grid(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), grid="larger")


def test_the_channel_projection_maps_widths_and_learns():
    torch.manual_seed(0)
    proj = ChannelProjection(3, 7)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = proj(x)
    assert y.shape == (4, 7, 5, 5) and proj[0].bias is None
    y.square().mean().backward()
    assert proj[0].weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    assert ChannelProjection(3, 7, norm=False)[0].bias is not None
