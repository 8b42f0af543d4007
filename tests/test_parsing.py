"""BiSeNet face parsing: kernels, the 'jaw' rule, strict checkpoint loading, lazy weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from musetalk_warm.errors import WeightsMissing
from musetalk_warm.avatars.parsing import BiSeNet, FaceParser, cheek_mask, jaw_kernel, labels_to_mask


def test_jaw_kernel_rows() -> None:
    k = jaw_kernel()
    assert k.shape == (33, 33) and k.dtype == np.uint8
    assert k[:10].sum() == 0
    assert np.flatnonzero(k[10]).tolist() == [16]
    assert np.flatnonzero(k[11]).tolist() == [15, 16, 17]
    assert np.flatnonzero(k[15]).tolist() == list(range(11, 22))  # width 11
    assert np.flatnonzero(k[20]).tolist() == list(range(6, 27))  # width 21
    for row in range(21, 33):
        assert np.flatnonzero(k[row]).tolist() == list(range(6, 27))


def test_cheek_mask_columns() -> None:
    m = cheek_mask()
    assert m.shape == (512, 512)
    assert (m[:, :167] == 255).all() and (m[:, 346:] == 255).all() and (m[:, 167:346] == 0).all()


def test_jaw_rule_on_a_synthetic_label_map() -> None:
    lab = np.zeros((512, 512), np.uint8)
    r0, r1, c0, c1 = 200, 299, 200, 311
    lab[r0 : r1 + 1, c0 : c1 + 1] = 1  # skin, between the cheek bands
    lab[190, 250] = 10  # nose inside the dilated band stays out
    lab[250, 260] = 10  # nose inside the skin stays out
    lab[400, 400] = 11  # mouth anywhere stays in
    lab[450:460, 230:240] = 14  # neck, far below: out
    lab[100:120, 20:61] = 1  # skin in the left cheek band, 41 wide: eroded away
    out = labels_to_mask(lab, "jaw")

    # By hand: cv2 dilation correlates with the kernel anchored at (16,16), so output
    # row y sees skin row y+d (d = -6..16) through a kernel row ±min(d+6, 10) wide.
    # The widest reach is from the largest d that still hits the block, min(16, r1-y).
    expected = np.zeros((512, 512), np.uint8)
    for y in range(r0 - 16, r1 + 7):
        half = min(min(16, r1 - y) + 6, 10)
        expected[y, c0 - half : c1 + half + 1] = 255
    expected[190, 250] = expected[250, 260] = 0
    expected[400, 400] = 255
    np.testing.assert_array_equal(out, expected)


def test_raw_and_neck_modes() -> None:
    lab = np.array([[0, 1, 10, 11, 12, 13, 14, 17]], np.uint8)
    assert labels_to_mask(lab, "raw").tolist() == [[0, 255, 0, 255, 255, 255, 0, 0]]
    assert labels_to_mask(lab, "neck").tolist() == [[0, 255, 0, 255, 255, 255, 255, 0]]


def test_checkpoint_names_load_strictly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = BiSeNet()
    keys = set(net.state_dict())
    # Names as in the public 79999_iter.pth.
    for name in (
        "cp.resnet.conv1.weight",
        "cp.resnet.bn1.running_mean",
        "cp.resnet.layer1.0.conv1.weight",
        "cp.resnet.layer2.0.downsample.0.weight",
        "cp.resnet.layer2.0.downsample.1.running_var",
        "cp.resnet.layer4.1.bn2.bias",
        "cp.arm16.conv.conv.weight",
        "cp.arm32.conv_atten.weight",
        "cp.arm32.bn_atten.weight",
        "cp.conv_head32.conv.weight",
        "cp.conv_head16.bn.weight",
        "cp.conv_avg.conv.weight",
        "ffm.convblk.conv.weight",
        "ffm.conv1.weight",
        "ffm.conv2.weight",
        "conv_out.conv.conv.weight",
        "conv_out.conv_out.weight",
        "conv_out16.conv_out.weight",
        "conv_out32.conv.bn.running_mean",
    ):
        assert name in keys, name
    assert net.state_dict()["conv_out.conv_out.weight"].shape == (19, 256, 1, 1)
    assert net.state_dict()["ffm.convblk.conv.weight"].shape == (256, 256, 1, 1)
    assert not any(k.startswith(("sp.", "cp.resnet.fc")) for k in keys)

    folder = tmp_path / "face-parse-bisent"
    folder.mkdir()
    torch.save(net.state_dict(), folder / "79999_iter.pth")
    parser = FaceParser(tmp_path, "cpu")
    face = Image.fromarray(np.random.default_rng(0).integers(0, 256, (212, 212, 3), dtype=np.uint8))
    labels = parser.labels(face)
    assert labels.shape == (512, 512) and labels.max() < 19
    seg = parser.segment(face, "jaw")
    assert seg.shape == (212, 212) and seg.dtype == np.uint8
    resized = Image.fromarray(labels_to_mask(labels, "jaw")).resize((212, 212), Image.BICUBIC)
    np.testing.assert_array_equal(seg, np.asarray(resized))
    loaded = parser._load().state_dict()
    torch.testing.assert_close(loaded["ffm.conv2.weight"], net.state_dict()["ffm.conv2.weight"])


def test_missing_weights_name_the_file(tmp_path: Path) -> None:
    parser = FaceParser(tmp_path / "models", "cpu")
    assert not parser.available
    with pytest.raises(WeightsMissing) as err:
        parser.segment(Image.new("RGB", (64, 64)))
    assert "79999_iter.pth" in err.value.message and str(tmp_path) not in str(err.value)
