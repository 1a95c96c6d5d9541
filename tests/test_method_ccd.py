"""CCD and KD+JDA: losses against loop references, gradient flow, the JDA operations, the paired
batch layout, one crop per view on image folders (the short end-to-end run on shapes is in
test_methods_train.py; the one on an image folder is here)."""

import pytest
import torch

from kdzoo.data import jda as J
from kdzoo.errors import UserError
from kdzoo.method import Batch, NetOutputs, StepOutputs
from kdzoo.registry import get_method

from .reference import cos, kl, mean_ce, mean_kl

# Two pairs, interleaved [orig0, aug0, orig1, aug1]; four classes.
S = torch.tensor([[1.0, 2.0, 0.5, -1.0],
                  [0.3, 1.5, 0.0, 0.2],
                  [0.0, -1.0, 3.0, 1.0],
                  [2.0, 0.5, 0.5, -0.5]])
T = torch.tensor([[2.0, 1.0, 0.0, -2.0],
                  [1.0, 1.5, -1.0, 0.0],
                  [1.0, 0.0, 2.0, 0.5],
                  [-1.0, 0.2, 1.0, 2.5]])
Y = torch.tensor([1, 1, 2, 2])


# -- the independent loop reference (tests/reference.py) applied to the CCD / KD+JDA formula ---


def _reference(s, t, y, tau, alpha, weight, weighted):
    s, t, y = s.tolist(), t.tolist(), y.tolist()
    hard = mean_ce(s, y)
    if weighted:
        pairs = len(s) // 2
        orig = sum(kl(s[2 * j], t[2 * j], tau) for j in range(pairs)) / pairs
        aug = sum((cos(t[2 * j], t[2 * j + 1]) + 1) * kl(s[2 * j + 1], t[2 * j + 1], tau) for j in range(pairs)) / pairs
        soft = (orig + aug) / 2
    else:
        soft = mean_kl(s, t, tau)
    return weight * alpha * hard, weight * (1 - alpha) * tau * tau * soft


def _terms(name, s=S, t=T, y=Y, **settings):
    cls = get_method(name)
    method = cls(cls.Config(**settings))
    return method.loss(StepOutputs(NetOutputs(s), y, teacher=NetOutputs(t)))


# -- (a) loss values ---------------------------------------------------------------------

@pytest.mark.parametrize("name,weighted", [("ccd", True), ("kd_jda", False)])
def test_default_loss_matches_loop_reference(name, weighted):
    terms = _terms(name)
    ce, kd = _reference(S, T, Y, 4.0, 0.5, 2.0, weighted)
    assert set(terms) == {"ce", "kd"}
    assert terms["ce"].item() == pytest.approx(ce, abs=1e-5)
    assert terms["kd"].item() == pytest.approx(kd, abs=1e-5)


@pytest.mark.parametrize("name,weighted", [("ccd", True), ("kd_jda", False)])
def test_settings_change_the_loss(name, weighted):
    terms = _terms(name, temperature=2.0, alpha_ce=0.3, kd_weight=1.5)
    ce, kd = _reference(S, T, Y, 2.0, 0.3, 1.5, weighted)
    assert terms["ce"].item() == pytest.approx(ce, abs=1e-5)
    assert terms["kd"].item() == pytest.approx(kd, abs=1e-5)


def test_ccd_defaults_reduce_to_ce_plus_tau_squared_soft():
    """kd_weight 2 · α 0.5 = 1 on CE and 2 · 0.5 · 16 = 16 on the soft term."""
    cls = get_method("ccd")
    c = cls.Config()
    assert (c.temperature, c.alpha_ce, c.kd_weight, c.policy, c.p) == (4.0, 0.5, 2.0, "cifar100", None)
    plain_ce = mean_ce(S.tolist(), Y.tolist())
    _, kd = _reference(S, T, Y, 4.0, 0.5, 2.0, True)
    terms = _terms("ccd")
    assert terms["ce"].item() == pytest.approx(plain_ce, abs=1e-5)
    assert terms["kd"].item() == pytest.approx(kd, abs=1e-5)
    assert kd == pytest.approx(_reference(S, T, Y, 4.0, 0.0, 1.0, True)[1])  # 2 · 0.5 · τ² S = τ² S


def test_confidence_weight_follows_the_teacher_cosine():
    """Identical teacher views weigh the augmented KL by 2, opposite ones by 0."""
    t_same = T.clone()
    t_same[1::2] = t_same[0::2] * 3.0  # same direction, cosine 1
    t_opposite = T.clone()
    t_opposite[1::2] = -t_opposite[0::2]  # cosine −1
    tau = 4.0
    for teacher, weight in ((t_same, 2.0), (t_opposite, 0.0)):
        s, t = S.tolist(), teacher.tolist()
        orig = (kl(s[0], t[0], tau) + kl(s[2], t[2], tau)) / 2
        aug = weight * (kl(s[1], t[1], tau) + kl(s[3], t[3], tau)) / 2
        kd = _terms("ccd", t=teacher)["kd"].item()
        assert kd == pytest.approx(16 * (orig + aug) / 2, abs=1e-5)


def test_soft_targets_are_accepted():
    soft = torch.nn.functional.one_hot(Y, 4).float()
    for name in ("ccd", "kd_jda"):
        assert _terms(name, y=soft)["ce"].item() == pytest.approx(_terms(name)["ce"].item(), abs=1e-6)


def test_bad_settings_and_odd_batches_fail_clearly():
    cls = get_method("ccd")
    with pytest.raises(UserError, match="p must"):
        cls(cls.Config(p=1.5))
    with pytest.raises(UserError, match="policy"):
        cls(cls.Config(policy="svhn"))
    with pytest.raises(RuntimeError, match="even size"):
        _terms("ccd", s=S[:3], t=T[:3], y=Y[:3])


def test_bf16_logits_are_computed_in_float32():
    terms = _terms("ccd", s=S.bfloat16(), t=T.bfloat16())
    assert all(v.dtype == torch.float32 for v in terms.values())


# -- (b) gradients -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ccd", "kd_jda"])
def test_gradient_reaches_student_not_teacher(name):
    s = S.clone().requires_grad_(True)
    t = T.clone().requires_grad_(True)  # even a teacher tensor that tracks gradients gets none
    method = get_method(name)()
    terms = method.loss(StepOutputs(NetOutputs(s), Y, teacher=NetOutputs(t)))
    sum(terms.values()).backward()
    assert t.grad is None
    assert s.grad is not None
    assert (s.grad[0::2].abs().sum(1) > 0).all() and (s.grad[1::2].abs().sum(1) > 0).all()
    s.grad = None
    method.loss(StepOutputs(NetOutputs(s), Y, teacher=NetOutputs(t)))["kd"].backward()  # the soft term alone
    assert s.grad.abs().sum() > 0 and t.grad is None


# -- (c) the JDA operations on hand-made tensors -----------------------------------------

def _img(*values, h=1, w=None):
    """A (1, 3, h, w) image with ``values`` along the width, the same in every channel and row."""
    row = torch.tensor(values, dtype=torch.float32)
    w = w or len(values)
    return row.view(1, 1, 1, w).expand(1, 3, h, w).clone()


PLUS, MINUS = torch.tensor([1.0]), torch.tensor([-1.0])


def test_magnitude_bins_follow_the_autoaugment_ranges():
    assert J.magnitude("solarize", 4) == pytest.approx(256 - 4 * 256 / 9)
    assert J.magnitude("solarize", 0) == 256 and J.magnitude("solarize", 9) == 0
    assert [J.magnitude("posterize", b) for b in range(10)] == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert J.magnitude("translateY", 8) == pytest.approx(8 / 9 * 150 / 331)
    assert J.magnitude("shearX", 9) == pytest.approx(0.3)
    assert J.magnitude("rotate", 3) == pytest.approx(10.0)
    assert J.magnitude("contrast", 3) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        J.magnitude("shearX", 10)


def test_policies_are_the_reference_sequences():
    c100 = J.POLICIES["cifar100"]
    assert c100.p == 0.3
    assert [op for op, _ in c100.ops] == ["autocontrast", "contrast", "posterize", "solarize", "translateY", "shearX",
                                          "brightness", "shearY", "translateX", "sharpness", "invert", "color",
                                          "equalize", "rotate"]
    assert [b for _, b in c100.ops][1:] == [3, 0, 4, 8, 5, 3, 0, 1, 5, 4, 4, 8, 3]
    assert J.POLICIES["cifar10"].p == 0.5 and len(J.POLICIES["cifar10"].ops) == 14
    assert J.POLICIES["imagenet"].p == 0.2 and len(J.POLICIES["imagenet"].ops) == 25
    for policy in J.POLICIES.values():
        assert all(op in J.OPS for op, _ in policy.ops)


def test_invert_solarize_posterize():
    x = _img(0.0, 0.2, 0.5, 0.6, 1.0)
    assert torch.equal(J.invert(x), 1 - x)
    # threshold 128 on the 8-bit scale: 0.5·255 = 127.5 stays, 0.6 and 1.0 flip
    assert torch.allclose(J.solarize(x, 128.0), _img(0.0, 0.2, 0.5, 0.4, 0.0))
    assert torch.equal(J.solarize(x, 256.0), x)
    levels = _img(255, 200, 100, 15, 16, 0) / 255
    assert torch.allclose(J.posterize(levels, 4), _img(240, 192, 96, 0, 16, 0) / 255)
    assert torch.allclose(J.posterize(levels, 6), _img(252, 200, 100, 12, 16, 0) / 255)
    assert torch.equal(J.posterize(levels, 8), levels)


def test_brightness_contrast_color_factors():
    x = _img(0.1, 0.4, 0.8)
    assert torch.allclose(J.brightness(x, 0.3, PLUS), (1.3 * x).clamp(0, 1))
    assert torch.allclose(J.brightness(x, 0.3, MINUS), 0.7 * x)
    mean = x.mean()  # a grey image: its luma is its value
    assert torch.allclose(J.contrast(x, 0.5, PLUS), (mean + 1.5 * (x - mean)).clamp(0, 1))
    assert torch.allclose(J.contrast(x, 0.5, MINUS), mean + 0.5 * (x - mean))
    assert torch.allclose(J.color(x, 0.9, PLUS), x)  # nothing to saturate in a grey image
    rgb = torch.tensor([0.6, 0.2, 0.4]).view(1, 3, 1, 1)
    luma = 0.299 * 0.6 + 0.587 * 0.2 + 0.114 * 0.4
    assert torch.allclose(J.color(rgb, 0.4, MINUS), luma + 0.6 * (rgb - luma))


def test_sharpness_keeps_border_and_blends_with_smooth_centre():
    x = torch.zeros(1, 3, 3, 3)
    x[..., 1, 1] = 1.0
    out = J.sharpness(x, 0.5, MINUS)  # factor 0.5: halfway to the smoothed image
    assert torch.equal(out[..., 0, :], x[..., 0, :]) and torch.equal(out[..., :, 2], x[..., :, 2])
    assert out[0, 0, 1, 1].item() == pytest.approx(0.5 * 5 / 13 + 0.5)


def test_autocontrast_and_equalize():
    x = torch.stack([_img(0.2, 0.4, 0.6)[0, 0], _img(0.5, 0.5, 0.5)[0, 0], _img(0.0, 0.5, 1.0)[0, 0]])[None]
    out = J.autocontrast(x)
    assert torch.allclose(out[0, 0], torch.tensor([[0.0, 0.5, 1.0]]))
    assert torch.equal(out[0, 1], x[0, 1])  # a flat channel is left alone
    assert torch.allclose(out[0, 2], x[0, 2])
    # 32×32 with half the pixels at level 10 and half at 20: PIL's step is 512 // 255 = 2,
    # so level 10 maps to (1 + 0) // 2 = 0 and level 20 to (1 + 512) // 2 → 255.
    two = torch.full((1, 3, 32, 32), 10 / 255)
    two[..., 16:, :] = 20 / 255
    eq = J.equalize(two)
    assert torch.equal(eq[..., :16, :], torch.zeros_like(eq[..., :16, :]))
    assert torch.equal(eq[..., 16:, :], torch.ones_like(eq[..., 16:, :]))
    flat = torch.full((1, 3, 4, 4), 0.3)
    assert torch.equal(J.equalize(flat), flat)


def test_translate_shifts_and_fills_grey():
    x = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8).expand(1, 3, 8, 8) / 64
    left = J.translate_x(x, 0.25, PLUS)  # the output at column u shows column u + 2
    assert torch.equal(left[..., :6], x[..., 2:]) and torch.allclose(left[..., 6:], torch.tensor(J.FILL))
    right = J.translate_x(x, 0.25, MINUS)
    assert torch.equal(right[..., 2:], x[..., :6]) and torch.allclose(right[..., :2], torch.tensor(J.FILL))
    up = J.translate_y(x, 0.25, PLUS)
    assert torch.equal(up[..., :6, :], x[..., 2:, :]) and torch.allclose(up[..., 6:, :], torch.tensor(J.FILL))
    both = J.translate_x(torch.cat([x, x]), 0.25, torch.tensor([1.0, -1.0]))  # one sign per image
    assert torch.equal(both[:1], left) and torch.equal(both[1:], right)


def test_rotate_and_shear_geometry():
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(J.rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)))  # counter-clockwise
    assert torch.equal(J.rotate(x, 0.0), x)
    corners = J.rotate(torch.zeros(1, 3, 32, 32), 30.0)
    assert torch.allclose(corners[..., 0, 0], torch.tensor(J.FILL)) and corners[..., 16, 16].eq(0).all()
    assert torch.allclose(J.shear_x(x, 0.0, PLUS.expand(2)), x, atol=1e-6)
    # rows constant along x survive a horizontal shear; pixels read from outside become grey
    rows = torch.linspace(0, 1, 8).view(1, 1, 8, 1).expand(1, 3, 8, 8)
    sheared = J.shear_x(rows, 0.3, PLUS)
    u = torch.arange(8) + 0.5
    v = torch.arange(8).view(8, 1) + 0.5
    inside = (u + 0.3 * v) < 8
    assert torch.allclose(sheared[0, 0][inside], rows[0, 0].expand(8, 8)[inside], atol=1e-6)
    assert torch.allclose(sheared[0, 0][~inside], torch.tensor(J.FILL))


def test_operations_match_pil_where_available():
    pytest.importorskip("PIL")
    np = pytest.importorskip("numpy")
    from PIL import Image, ImageEnhance, ImageOps

    arr = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(1)) * 255).round().to(torch.uint8).numpy()
    img = Image.fromarray(arr)
    grey = (128, 128, 128)

    def reference(op, m, s):
        if op in ("shearX", "shearY", "translateX", "translateY"):
            coeffs = {"shearX": (1, m * s, 0, 0, 1, 0), "shearY": (1, 0, 0, m * s, 1, 0),
                      "translateX": (1, 0, m * 16 * s, 0, 1, 0), "translateY": (1, 0, 0, 0, 1, m * 16 * s)}[op]
            resample = Image.BICUBIC if op.startswith("shear") else Image.NEAREST
            return img.transform(img.size, Image.AFFINE, coeffs, resample, fillcolor=grey)
        if op == "rotate":
            rot = img.convert("RGBA").rotate(m)
            return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert("RGB")
        enhancers = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
                     "sharpness": ImageEnhance.Sharpness, "brightness": ImageEnhance.Brightness}
        if op in enhancers:
            return enhancers[op](img).enhance(1 + m * s)
        return {"posterize": lambda: ImageOps.posterize(img, int(m)), "solarize": lambda: ImageOps.solarize(img, m),
                "autocontrast": lambda: ImageOps.autocontrast(img), "equalize": lambda: ImageOps.equalize(img),
                "invert": lambda: ImageOps.invert(img)}[op]()

    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    for op in J.OPS:
        for level in (2, 7):
            m = J.magnitude(op, level)
            for s in (1.0, -1.0):
                ref = torch.from_numpy(np.array(reference(op, m, s))).permute(2, 0, 1)[None].float() / 255
                out = J.OPS[op](x, m, torch.tensor([s]))
                # PIL rounds every result to 8 bits, and the enhancers' grey image too
                tolerance = 1.5 if op in ("color", "contrast", "sharpness", "brightness") else 1.01
                assert (out - ref).abs().max().item() <= tolerance / 255, (op, level, s)


def test_jda_preserves_shape_dtype_device_and_range():
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    for policy in J.POLICIES:
        for dtype in (torch.float32, torch.float64, torch.float16):
            out = J.JDA(policy, p=0.7)(x.to(dtype))
            assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
            assert out.min() >= 0 and out.max() <= 1
    u8 = (x * 255).to(torch.uint8)
    out = J.JDA("cifar100", p=1.0)(u8)
    assert out.dtype == torch.uint8 and out.shape == u8.shape


def test_whole_batch_and_subset_application_agree():
    """The GPU default (transform all, keep the fired) equals the CPU default (transform the fired)."""
    x = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    for policy in J.POLICIES:
        a = J.JDA(policy, full_batch=True)(x, generator=torch.Generator().manual_seed(9))
        b = J.JDA(policy, full_batch=False)(x, generator=torch.Generator().manual_seed(9))
        assert torch.allclose(a, b, atol=1e-6)
        assert not torch.equal(a, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_jda_on_gpu_stays_on_gpu():
    x = torch.rand(8, 3, 16, 16, device="cuda")
    out = J.JDA("cifar100", p=1.0)(x)
    assert out.is_cuda and out.shape == x.shape and 0 <= out.min() <= out.max() <= 1


def test_p_zero_is_identity_and_p_one_applies_every_op_in_order():
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(J.JDA("cifar100", p=0.0)(x), x)
    # a hand-made policy with a closed form: invert, then keep 4 bits
    assert torch.allclose(J.JDA([("invert", 0), ("posterize", 9)], p=1.0)(x), J.posterize(1 - x, 4))
    assert torch.equal(J.JDA([("invert", 0), ("invert", 0)], p=1.0)(x), x)
    # the full policy at p = 1: the same as composing every operation with the same draws
    jda = J.JDA("cifar100", p=1.0)
    out = jda(x, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    expected = x
    for op, _, m in jda.ops:
        assert (torch.rand(5, generator=g) < 1.0).all()
        signs = torch.where(torch.rand(5, generator=g) < 0.5, -1.0, 1.0)
        expected = J.OPS[op](expected, m, signs)
    assert torch.allclose(out, expected, atol=1e-6)
    assert ((out - x).abs().flatten(1).amax(1) > 0.05).all()


def test_each_image_flips_its_own_coin():
    x = torch.zeros(400, 3, 1, 1)
    out = J.JDA([("invert", 0)], p=0.3)(x, generator=torch.Generator().manual_seed(4))
    fired = out[:, 0, 0, 0] == 1
    assert 0.22 < fired.float().mean().item() < 0.38
    assert torch.equal(out[fired], torch.ones_like(out[fired])) and torch.equal(out[~fired], x[~fired])


def _recording_augment():
    """An augmentation that changes nothing and keeps every batch it was called with."""
    calls = []

    def augment(images):
        calls.append(images)
        return images + 0.0

    return augment, calls


def test_paired_views_layout():
    x = torch.rand(3, 3, 8, 8)
    y = torch.tensor([4, 7, 1])
    augment, calls = _recording_augment()
    views, targets = J.paired_views(x, y, augment, J.JDA([("invert", 0)], p=1.0))
    assert views.shape == (6, 3, 8, 8)
    assert torch.equal(views[0::2], x) and torch.allclose(views[1::2], 1 - x)  # even original, odd augmented
    assert targets.tolist() == [4, 4, 7, 7, 1, 1]
    assert len(calls) == 2 and torch.allclose(calls[1], 1 - x)  # crop/flip drawn separately for each view
    soft = torch.eye(3)
    _, soft_targets = J.paired_views(x, soft, augment, J.JDA([("invert", 0)], p=1.0))
    assert torch.equal(soft_targets, soft.repeat_interleave(2, dim=0))


def test_prepare_batch_builds_the_pairs_with_independent_crops():
    from kdzoo.data.loaders import CropFlip

    method = get_method("ccd")(get_method("ccd").Config(p=0.0))  # p = 0: both views are crops of the same image
    x = torch.rand(4, 3, 16, 16)
    torch.manual_seed(0)
    batch = method.prepare_batch(Batch(x, torch.arange(4), torch.arange(10, 14)), CropFlip(padding=4))
    images, targets = batch.images, batch.targets
    assert batch.index.tolist() == [10, 10, 11, 11, 12, 12, 13, 13]  # both views carry their image's index
    assert images.shape == (8, 3, 16, 16) and targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert not torch.equal(images[0::2], images[1::2])


# -- image folders: each view its own crop -----------------------------------------------------

def test_paired_views_takes_one_loader_crop_per_view():
    x = torch.rand(3, 2, 3, 8, 8)  # (B, views, C, H, W): two crops of each image, drawn by the loader
    y = torch.tensor([4, 7, 1])
    augment, calls = _recording_augment()
    views, targets = J.paired_views(x, y, augment, J.JDA([("invert", 0)], p=1.0))
    assert views.shape == (6, 3, 8, 8) and targets.tolist() == [4, 4, 7, 7, 1, 1]
    assert torch.equal(views[0::2], x[:, 0]) and torch.allclose(views[1::2], 1 - x[:, 1])  # JDA on the second crop only
    assert len(calls) == 2 and torch.equal(calls[0], x[:, 0]) and torch.allclose(calls[1], 1 - x[:, 1])
    with pytest.raises(ValueError, match="one per view"):
        J.paired_views(torch.rand(3, 3, 3, 8, 8), y, augment, J.JDA([("invert", 0)], p=1.0))


def test_paired_views_of_a_4d_batch_draw_as_before():
    """A batch of whole images (in-memory data): augment(x), then augment(jda(x)), from one stream."""
    from kdzoo.data.loaders import CropFlip

    x, y, augment, jda = torch.rand(4, 3, 16, 16), torch.arange(4), CropFlip(padding=2), J.JDA("cifar100")
    torch.manual_seed(3)
    views, _ = J.paired_views(x, y, augment, jda)
    torch.manual_seed(3)
    original = augment(x)
    augmented = augment(jda(x))
    assert torch.equal(views[0::2], original) and torch.equal(views[1::2], augmented)


def _noise_tree(root):
    """train/ and val/ with two classes of 3 noise images each (40 × 30): any two crops differ."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for k in range(2):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = torch.randint(0, 256, (30, 40, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def test_image_folders_give_each_jda_view_its_own_random_resized_crop(tmp_path):
    from kdzoo.build import data_request
    from kdzoo.config import RunConfig
    from kdzoo.data import DataRequest, get_dataset
    from kdzoo.teacher import teacher_run_config

    # a JDA run asks the loader for two crops; a plain run and the teacher's own training for one
    cfg = RunConfig(method="ccd", teacher="test_resnet", dataset="imagefolder")
    assert data_request(cfg).views == 2 and data_request(RunConfig(method="kd_jda", teacher="test_resnet")).views == 2
    assert data_request(RunConfig(method="kd", teacher="test_resnet")).views == 1
    assert data_request(teacher_run_config(cfg)).views == 1

    tree = _noise_tree(tmp_path)
    spec = get_dataset("imagefolder")
    plain = spec.build(DataRequest(root=str(tree), input_size=16, batch_size=3, workers=0))
    torch.manual_seed(0)
    images, _, _ = next(iter(plain.train.batches()))
    assert images.shape == (3, 3, 16, 16)  # one view: the loader's batch as before
    paired = spec.build(DataRequest(root=str(tree), input_size=16, batch_size=3, workers=0, views=2))
    torch.manual_seed(0)
    images, targets, index = next(iter(paired.train.batches()))
    assert images.shape == (3, 2, 3, 16, 16)
    for first, second in zip(images[:, 0], images[:, 1]):
        assert not torch.equal(first, second) and not torch.equal(first, second.flip(-1))  # not one crop, flipped

    method = get_method("ccd")(get_method("ccd").Config(p=0.0))  # p = 0: the views differ by their crops alone
    batch = method.prepare_batch(Batch(images, targets, index), paired.augment)  # the folder's augment: a flip
    assert batch.images.shape == (6, 3, 16, 16) and batch.index.tolist() == index.repeat_interleave(2).tolist()
    for b in range(3):
        for view, crop in ((batch.images[2 * b], images[b, 0]), (batch.images[2 * b + 1], images[b, 1])):
            assert torch.equal(view, crop) or torch.equal(view, crop.flip(-1))


def test_ccd_trains_end_to_end_on_an_image_folder(tmp_path, capsys, monkeypatch):
    """The loader's (B, 2, C, H, W) batches through a whole run, the teacher trained on one view."""
    import json
    import math

    from kdzoo.cli import main

    from .test_identity import _folder_args, _image_tree

    ccd_module = __import__(get_method("ccd").__module__, fromlist=["paired_views"])
    shapes = []

    def recording(images, *args):
        shapes.append(tuple(images.shape))
        return J.paired_views(images, *args)

    monkeypatch.setattr(ccd_module, "paired_views", recording)
    tree = _image_tree(tmp_path / "tree")
    args = _folder_args(tmp_path, tree, "--method", "ccd", "--teacher", "test_resnet", "--teacher-epochs", "1",
                        "--run-name", "jda")
    assert main(args) == 0
    result = json.loads((tmp_path / "runs" / "jda" / "result.json").read_text())
    assert result["complete"] and math.isfinite(result["final_train_loss"])
    assert shapes == [(4, 2, 3, 16, 16)] * 2  # 8 images at batch 4: two steps of two crops per image
