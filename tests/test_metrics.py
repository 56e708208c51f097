"""Evaluation metrics on synthetic cases with known answers."""

import math

import pytest
import torch

from biwm.core.metrics import diversity, motion, pose_errors, psnr, psnr_per_chunk, ssim


def video(b=2, t=4, h=16, w=20, value=0.0):
    """Frames [b, t, 3, h, w] in [-1, 1] filled with ``value`` (given on the 0-1 scale)."""
    return torch.full((b, t, 3, h, w), value * 2 - 1)


def test_psnr_identical_and_known_error():
    x = video(value=0.5)
    assert torch.isinf(psnr(x, x)).all()
    # a uniform error of 0.1 (on the 0-1 scale) is an MSE of 0.01: 20 dB
    assert psnr(x, video(value=0.6)) == pytest.approx(torch.full((2,), 20.0), abs=1e-3)
    u8 = torch.full((1, 2, 3, 4, 4), 255, dtype=torch.uint8)
    assert psnr(u8, torch.zeros_like(u8)).item() == pytest.approx(0.0, abs=1e-6)


def test_psnr_per_chunk_splits_time():
    truth = video(b=1, t=4)
    pred = truth.clone()
    pred[:, :2] += 0.2  # 0.1 on the 0-1 scale: 20 dB
    pred[:, 2:] += 0.02  # 0.01: 40 dB
    assert psnr_per_chunk(pred, truth, 2)[0].tolist() == pytest.approx([20.0, 40.0], abs=1e-3)
    with pytest.raises(ValueError, match="do not split into chunks of 3"):
        psnr_per_chunk(pred, truth, 3)


def _patterns():
    i, j, c = torch.meshgrid(torch.arange(16), torch.arange(20), torch.arange(3), indexing="ij")
    a = ((i * 7 + j * 13 + c * 29) % 64) / 63.0
    b = ((i * i + 3 * j + 5 * c) % 50) / 49.0
    a2 = ((i * 3 + j * 5 + c) % 17) / 16.0
    return [x.permute(2, 0, 1).float() * 2 - 1 for x in (a, b, a2, (a2 * 0.8 + 0.1).clamp(0, 1))]


def test_ssim_matches_scikit_image_reference():
    a, b, a2, a2_dim = _patterns()
    # Values from skimage 0.26 structural_similarity(gaussian_weights=True, sigma=1.5,
    # use_sample_covariance=False, data_range=1.0, channel_axis=2) on the same HxWx3 arrays.
    assert ssim(a, b).item() == pytest.approx(-0.09338776074567597, abs=1e-5)
    assert ssim(a2, a2_dim).item() == pytest.approx(0.9757496734198927, abs=1e-5)


def test_ssim_identical_constant_and_shapes():
    a, b, _, _ = _patterns()
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-6)
    # two flat images: only the luminance term is left, (2 m n + C1) / (m^2 + n^2 + C1)
    m, n, c1 = 0.3, 0.7, 0.01**2
    flat = ssim(torch.full((3, 16, 16), m * 2 - 1), torch.full((3, 16, 16), n * 2 - 1)).item()
    assert flat == pytest.approx((2 * m * n + c1) / (m * m + n * n + c1), abs=1e-5)
    batch = torch.stack([torch.stack([a, b]), torch.stack([b, b])])  # [2, 2, 3, H, W]
    out = ssim(batch, torch.stack([torch.stack([a, a]), torch.stack([b, a])]))
    assert out.shape == (2, 2) and out[0, 0] == pytest.approx(1.0, abs=1e-6) and out[1, 0] == pytest.approx(1.0, abs=1e-6)
    small = ssim(torch.zeros(3, 6, 6), torch.zeros(3, 6, 6))  # smaller than the 11-pixel window
    assert small.item() == pytest.approx(1.0)


def test_ssim_falls_with_shift():
    a = _patterns()[0]
    shifted = [ssim(a, torch.roll(a, s, dims=-1)).item() for s in (0, 1, 3)]
    # the pattern repeats with no period near 1 or 3 pixels: a shift destroys its structure
    assert shifted[0] == pytest.approx(1.0, abs=1e-6) and shifted[1] < 0.5 and shifted[2] < shifted[1]


def test_motion_static_and_moving_square():
    still = video(b=1, t=5, h=16, w=16, value=0.2)
    assert motion(still).sum() == 0
    moving = still.clone()
    for t in range(5):  # a 4x4 white square moving one pixel right per frame
        moving[0, t, :, 6:10, 2 + t:6 + t] = 1.0
    # each step uncovers one 4-pixel column and covers another: 8 of 256 pixels change
    assert motion(moving)[0].tolist() == pytest.approx([8 / 256] * 4)
    faint = still + 0.1 * (torch.arange(5) % 2).view(1, 5, 1, 1, 1)  # flicker of 0.05 < threshold 0.1
    assert motion(faint).sum() == 0


def test_diversity_known_spread():
    base = video(b=1, t=2, value=0.2)
    same = torch.stack([base, base, base], dim=1)  # [B, S, T, 3, H, W]
    assert diversity(same).item() == 0
    c = 0.1
    spread = torch.stack([base, base + 2 * c, base + 4 * c], dim=1)  # 0, c, 2c on the 0-1 scale
    # pairs differ by c, 2c and c
    assert diversity(spread).item() == pytest.approx(4 * c / 3, abs=1e-5)
    with pytest.raises(ValueError, match="at least 2 samples"):
        diversity(base[:, None])


def test_pose_errors():
    from biwm.core.camera import pose_from_yaw_pitch

    a = pose_from_yaw_pitch(torch.zeros(2, 3), torch.zeros(2))
    b = pose_from_yaw_pitch(torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([math.radians(10), 0.0]),
                            torch.tensor([0.0, math.radians(-25)]))
    angle, distance = pose_errors(a, b)
    assert angle.tolist() == pytest.approx([10.0, 25.0], abs=1e-3)
    assert distance.tolist() == pytest.approx([5.0, 0.0], abs=1e-6)
