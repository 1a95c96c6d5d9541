import pytest
import torch

from kdzoo.data import DataRequest, get_dataset, shapes
from kdzoo.data.loaders import CropFlip, InMemoryLoader, random_crop
from kdzoo.errors import UserError


def test_shapes_is_deterministic_and_seed_dependent():
    a = shapes.generate(64, 16, seed=3)
    b = shapes.generate(64, 16, seed=3)
    c = shapes.generate(64, 16, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_shapes_labels_masks_and_balance():
    images, labels, masks = shapes.generate(2000, 16, seed=0)
    assert images.dtype == torch.uint8 and images.shape == (2000, 3, 16, 16)
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() > 150, counts
    # the main shape is visible in its own mask for nearly every image
    visible = [(masks[i] == labels[i] + 1).any() for i in range(2000)]
    assert sum(visible) / 2000 > 0.97
    assert masks.max() <= 10


def test_random_crop_is_a_translation():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    torch.manual_seed(0)
    out = random_crop(x, 2)
    assert out.shape == x.shape
    # every output is the input shifted by some (dy, dx) in [-2, 2] with zero fill
    for b in range(2):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.zeros_like(x[b])
                ys, xs = slice(max(0, -dy), 8 - max(0, dy)), slice(max(0, -dx), 8 - max(0, dx))
                yt, xt = slice(max(0, dy), 8 - max(0, -dy)), slice(max(0, dx), 8 - max(0, -dx))
                shifted[:, ys, xs] = x[b][:, yt, xt]
                found |= torch.equal(shifted, out[b])
        assert found
    assert CropFlip(0, flip=False)(x) is x or torch.equal(CropFlip(0, flip=False)(x), x)


def test_loader_order_depends_on_seed_and_epoch_only():
    x, y = torch.arange(20).view(20, 1, 1, 1), torch.arange(20)
    a = InMemoryLoader(x, y, 5, shuffle=True, seed=1)
    b = InMemoryLoader(x, y, 5, shuffle=True, seed=1)
    assert [t.tolist() for _, t, _ in a] == [t.tolist() for _, t, _ in b]
    b.set_epoch(1)
    assert [t.tolist() for _, t, _ in a] != [t.tolist() for _, t, _ in b]
    # skipping batches (mid-epoch resume) yields the same tail
    assert [t.tolist() for _, t, _ in a.batches(skip=2)] == [t.tolist() for _, t, _ in a][2:]


def test_imagefolder_loads_a_small_tree(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for k, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
            folder = tmp_path / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), colour).save(folder / f"{i}.png")
    bundle = get_dataset("imagefolder").build(DataRequest(root=str(tmp_path), input_size=24, batch_size=2, workers=0))
    assert bundle.num_classes == 2 and bundle.class_names == ("class0", "class1")
    images, targets, _ = next(iter(bundle.test))
    assert images.shape == (6, 3, 24, 24) and images.dtype == torch.float32 and targets.tolist() == [0, 0, 0, 1, 1, 1]


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        get_dataset("imagefolder").build(DataRequest(root=str(tmp_path / "missing")))
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="hold no images"):
        get_dataset("imagefolder").build(DataRequest(root=str(tmp_path)))
