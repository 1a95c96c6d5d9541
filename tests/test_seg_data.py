"""Segmentation data: joint image/mask augmentation, shapes masks, and the VOC and Cityscapes
loaders on small fake folder trees written here."""

import numpy as np
import pytest
import torch
from PIL import Image

from kdzoo.data import DataRequest, get_dataset
from kdzoo.data.joint import JointAugment, fit
from kdzoo.errors import UserError
from kdzoo.metrics import IGNORE_INDEX


def _labelled_pair(b=4, size=12, block=1):
    """Images whose first channel encodes the mask value, so alignment can be read back; labels
    come in ``block``×``block`` squares."""
    coarse = torch.randint(0, 5, (b, -(-size // block), -(-size // block)))
    masks = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :size, :size]
    images = torch.rand(b, 3, size, size)
    images[:, 0] = masks.float() / 10
    return images, masks


def test_joint_augment_at_scale_one_is_an_exact_flip_or_identity():
    images, masks = _labelled_pair()
    torch.manual_seed(0)
    out_images, out_masks = JointAugment(12, scale=(1.0, 1.0))(images, masks)
    flipped = [torch.equal(out_masks[i], masks[i].flip(-1)) for i in range(4)]
    kept = [torch.equal(out_masks[i], masks[i]) for i in range(4)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    for i in range(4):
        reference = images[i].flip(-1) if flipped[i] and not kept[i] else images[i]
        assert torch.allclose(out_images[i], reference, atol=1e-5)
    assert out_masks.dtype == torch.int64


def test_joint_augment_keeps_labels_on_their_pixels_and_pads_with_ignore():
    images, masks = _labelled_pair(b=8, size=16, block=4)
    torch.manual_seed(1)
    out_images, out_masks = JointAugment(16, scale=(0.5, 0.7), flip=True)(images, masks)
    padded = out_masks == IGNORE_INDEX
    # a scaled-down image cannot fill the crop: padding in every sample, black apart from the
    # one-pixel rim where bilinear sampling still reaches the image's edge
    assert padded.flatten(1).any(dim=1).all()
    black = (out_images.permute(1, 0, 2, 3)[:, padded] == 0).all(dim=0).float().mean()
    assert black > 0.8, black
    # inside the label squares (bilinear and nearest differ only at their borders) the encoded value matches
    labelled = ~padded
    decoded = (out_images[:, 0] * 10).round().long()
    agree = (decoded == out_masks)[labelled].float().mean()
    assert agree > 0.75, agree


def test_fit_pads_bottom_right_with_zero_and_ignore_and_crops_top_left():
    image = torch.full((3, 2, 3), 7, dtype=torch.uint8)
    mask = torch.ones(2, 3, dtype=torch.uint8)
    out_image, out_mask = fit(image, mask, (4, 2))
    assert out_image.shape == (3, 4, 2) and out_mask.shape == (4, 2)
    assert torch.equal(out_mask, torch.tensor([[1, 1], [1, 1], [255, 255], [255, 255]], dtype=torch.uint8))
    assert out_image[:, 2:].sum() == 0 and torch.all(out_image[:, :2] == 7)


def test_shapes_for_segmentation_gives_masks_with_background_and_ten_classes():
    spec = get_dataset("shapes", "seg")
    bundle = spec.build(DataRequest(input_size=20, train_size=32, test_size=16, batch_size=8))
    assert bundle.num_classes == 11 and bundle.class_names[0] == "background"
    images, masks, _ = next(iter(bundle.train))
    assert images.shape == (8, 3, 20, 20) and images.dtype == torch.float32 and masks.shape == (8, 20, 20)
    test_images, test_masks, _ = next(iter(bundle.test))
    assert test_masks.max() <= 10 and (test_masks == 0).any() and (test_masks > 0).any()


def test_the_same_name_for_another_task_is_a_clear_error():
    with pytest.raises(UserError, match="'voc' is for --task seg"):
        get_dataset("voc")
    with pytest.raises(UserError, match="'cifar10' is for --task cls"):
        get_dataset("cifar10", "seg")


# -- fake folder trees -------------------------------------------------------------------------

def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def _fake_voc(root, names=("2007_000001", "2007_000002", "2007_000003")):
    base = root / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        h, w = 20 + i, 30
        _png(base / "JPEGImages" / f"{name}.jpg", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[5:10, 5:10] = 15           # person
        mask[4, :] = 255                # a border
        _png(base / "SegmentationClass" / f"{name}.png", mask)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names[:2]) + "\n")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text(names[2] + "\n")


def test_voc_loads_from_a_local_tree_and_pads_to_the_canvas(tmp_path):
    _fake_voc(tmp_path)
    bundle = get_dataset("voc", "seg").build(DataRequest(root=str(tmp_path), input_size=24, batch_size=2, workers=0))
    assert bundle.num_classes == 21 and bundle.class_names[15] == "person"
    images, masks, _ = next(iter(bundle.train))
    assert images.shape == (2, 3, 24, 24) and masks.shape == (2, 24, 24)
    images, masks, _ = next(iter(bundle.test))
    assert masks.shape == (1, 512, 512)           # the whole image, padded with ignore
    assert (masks[0, 5:10, 5:10] == 15).all() and (masks[0, 4] == IGNORE_INDEX).all()
    assert (masks[0, 22:] == IGNORE_INDEX).all() and (masks[0, :, 30:] == IGNORE_INDEX).all()
    assert set(masks.unique().tolist()) == {0, 15, IGNORE_INDEX}


def test_voc_with_a_wrong_layout_is_one_clear_error(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(UserError, match="VOC 2012 not found.*VOCdevkit/VOC2012"):
        get_dataset("voc", "seg").build(DataRequest(root=str(tmp_path), workers=0))
    with pytest.raises(UserError, match="needs --data-root"):
        get_dataset("voc", "seg").build(DataRequest(workers=0))


def test_cityscapes_maps_label_ids_to_train_ids_at_half_resolution(tmp_path):
    for split in ("train", "val"):
        for k in range(2):
            stem = f"aachen_00000{k}_000019"
            _png(tmp_path / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png",
                 np.full((16, 32, 3), 100, dtype=np.uint8))
            labels = np.zeros((16, 32), dtype=np.uint8)   # id 0: unlabeled → ignore
            labels[:8] = 7                                 # road → train id 0
            labels[8:, :16] = 26                           # car → train id 13
            _png(tmp_path / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", labels)
    bundle = get_dataset("cityscapes", "seg").build(DataRequest(root=str(tmp_path), input_size=16, batch_size=2, workers=0))
    assert bundle.num_classes == 19 and bundle.class_names[0] == "road" and bundle.class_names[13] == "car"
    images, masks, _ = next(iter(bundle.test))
    assert masks.shape == (2, 512, 1024)
    assert (masks[:, :4, :16] == 0).all() and (masks[:, 4:8, :8] == 13).all()
    assert (masks[:, 4:8, 8:16] == IGNORE_INDEX).all() and (masks[:, 8:] == IGNORE_INDEX).all()


def test_cityscapes_with_a_wrong_layout_is_one_clear_error(tmp_path):
    (tmp_path / "leftImg8bit").mkdir()
    with pytest.raises(UserError, match="Cityscapes not found.*gtFine"):
        get_dataset("cityscapes", "seg").build(DataRequest(root=str(tmp_path), workers=0))
