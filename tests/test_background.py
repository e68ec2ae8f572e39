"""Background level and noise of one channel (`analysis.background`)."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.background import estimate_background


@pytest.mark.parametrize("sigma", [0.7, 1.0, 1.5, 2.0, 3.0, 4.5, 8.0, 20.0])
def test_noise_is_measured_between_whole_numbers(sigma: float) -> None:
    """Integer pixels' noise, from 0.7 DN up, within 7 % (the middle whole
    number alone was off by up to half at 1-2 DN)."""
    rng = np.random.default_rng(int(sigma * 10))
    img = np.round(200 + rng.normal(0, sigma, (1024, 1024))).astype(np.uint16)
    assert estimate_background(img).noise == pytest.approx(sigma, rel=0.07)


def test_the_level_follows_vignetting_under_dense_cells() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:512, 0:640]
    vignette = 300 - 0.0001 * ((yy - 256) ** 2 + (xx - 320) ** 2)
    img = vignette + rng.normal(0, 5, yy.shape)
    # 400 bright cells, 8 % of the pixels
    for r, c in rng.integers(8, [504, 632], size=(400, 2)):
        img[r - 4 : r + 4, c - 4 : c + 4] += 800
    bg = estimate_background(np.round(img).astype(np.uint16))
    inner = (slice(32, -32), slice(32, -32))  # block centres bound the map
    err = bg.level[inner] - vignette[inner]
    assert abs(float(np.median(err))) < 0.5  # the cells do not lift it
    assert np.abs(err).max() < 4  # a 25 DN fall to the corners followed
    assert bg.noise == pytest.approx(5, rel=0.05)


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64]
)
def test_the_signal_is_the_image_less_the_map_to_the_last_bit(dtype: type) -> None:
    rng = np.random.default_rng(2)
    img = (rng.random((130, 201)) * 200).astype(dtype)
    if dtype == np.int32:  # beyond float32's whole numbers: rounded first
        img += 2**24 + 1
    if dtype == np.float64:
        img += rng.random(img.shape)  # not float32 values
    bg = estimate_background(img)
    want = img.astype(np.float32) - bg.level
    assert np.array_equal(bg.subtract_from(img), want)
    view = img[:, ::-1]  # not contiguous
    assert np.array_equal(bg.subtract_from(view), view.astype(np.float32) - bg.level)


def test_the_signal_and_the_sampled_level_agree_with_the_map() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(90, 4000, (300, 451)).astype(np.uint16)
    bg = estimate_background(img)
    # the same values as subtracting the map, to the last bit
    assert np.array_equal(bg.subtract_from(img), img.astype(np.float32) - bg.level)
    np.testing.assert_allclose(bg.sampled(2), bg.level[:300:2, :450:2], rtol=1e-6)
    assert bg.at(299.7, -3) == pytest.approx(float(bg.level[299, 0]), rel=1e-6)


@pytest.mark.parametrize(
    "shape", [(300, 451), (40, 451), (300, 50), (40, 50)]
)  # 1 block row/col
def test_the_level_at_pixels_is_the_maps_and_one_value_per_pixel(
    shape: tuple[int, int],
) -> None:
    # the level read where it is needed (crops, pixel lists) is the map's to
    # float32 rounding, on grids of one block row or column too; and a pixel
    # has one value whether asked for in a crop, a list or a strided sample
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = 200 + 0.3 * yy - 0.2 * xx + rng.normal(0, 3, shape)
    bg = estimate_background(np.round(img).astype(np.uint16), block=32)
    h, w = shape
    everywhere = bg.level_at(slice(None), slice(None))
    assert everywhere.dtype == np.float32 and everywhere.shape == shape
    np.testing.assert_allclose(everywhere, bg.level, rtol=1e-6)
    flat = rng.integers(0, h * w, 500)
    assert np.array_equal(bg.level_at(flat // w, flat % w), everywhere.ravel()[flat])
    crop = (slice(3, h, 2), slice(w - 1, 0, -3))
    assert np.array_equal(bg.level_at(*crop), everywhere[crop])
    rows, cols = np.arange(h)[crop[0]], np.arange(w)[crop[1]]
    assert np.array_equal(bg.level_at(rows[:, None], cols), everywhere[crop])
