"""Volume augmentation: shapes, ranges, determinism, reflect padding, fit checks."""
import pytest
import torch

from simcrop.data.augment import AugmentConfig, center_crop_pad, check_fits, hu_to_unit, pad_to, random_augment


def test_hu_to_unit_clips_and_scales():
    hu = torch.tensor([-3000.0, -1000, 0, 500, 1000, 3000])
    assert torch.equal(hu_to_unit(hu), torch.tensor([-1.0, -1, 0, 0.5, 1, 1]))


def test_random_augment_shape_range_and_determinism():
    x = hu_to_unit(torch.randn(40, 36, 20) * 800)
    cfg = AugmentConfig((32, 32, 16), scale_min=0.8, flip_prob=0.5, shift_prob=0.5, shift_max=0.1)
    outs = [random_augment(x, cfg, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert outs[0].shape == (32, 32, 16) and outs[0].dtype == torch.float32
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    for o in outs:
        assert o.min() >= -1.1 - 1e-6 and o.max() <= 1.1 + 1e-6


def test_random_augment_without_randomness_is_a_crop_of_the_input():
    x = torch.arange(20 * 20 * 10, dtype=torch.float32).reshape(20, 20, 10)
    cfg = AugmentConfig((16, 16, 8), scale_min=1.0, flip_prob=0.0, shift_prob=0.0)
    out = random_augment(x, cfg, torch.Generator().manual_seed(3))
    start = [int((out[0, 0, 0] == x).nonzero()[0][i]) for i in range(3)]
    assert torch.equal(out, x[start[0] : start[0] + 16, start[1] : start[1] + 16, start[2] : start[2] + 8])


def test_pad_is_reflect_and_centre_crop_is_centred():
    x = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1).expand(4, 3, 3).contiguous()
    p = pad_to(x, (8, 3, 3))
    assert p[:, 0, 0].tolist() == [2.0, 1, 0, 1, 2, 3, 2, 1]
    y = torch.arange(10.0).reshape(10, 1, 1).expand(10, 2, 2)
    assert center_crop_pad(y, (4, 2, 2))[:, 0, 0].tolist() == [3.0, 4, 5, 6]


def test_pad_works_for_volumes_much_smaller_than_the_crop():
    x = torch.arange(3.0).reshape(3, 1, 1).expand(3, 2, 2).contiguous()
    assert pad_to(x, (5, 3, 3)).shape == (5, 3, 3)


@pytest.mark.parametrize("shape,ok", [((40, 40, 20), True), ((33, 40, 20), True), ((32, 40, 20), False),
                                      ((40, 40), False)])
def test_check_fits(shape, ok):
    reason = check_fits(shape, (64, 64, 32))
    assert (reason is None) == ok
