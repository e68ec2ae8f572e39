from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from controller.layouts import get_layout
from hardware_configs import CONFIG_DIR
from simulators import KINDS, World, WorldConfig, open_simulated_core
from simulators.config import STAINS

LAYOUT = get_layout("test-3x4")
DAPI, FITC, PE, APC = range(4)


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=11), LAYOUT)


def _centre_field(world: World) -> tuple[float, float]:
    # a field of the middle row, away from the wall
    return (LAYOUT.center_x_um + world.fov_w / 2, LAYOUT.center_y_um)


def test_same_frame_same_pixels_whatever_came_before(world: World) -> None:
    x, y = _centre_field(world)
    z = world.surface_z(x, y)
    first = world.renderer.frame(x, y, z, PE, 100.0)
    # image elsewhere, in other channels, then come back
    world.renderer.frame(x + 3000, y, z, DAPI, 20.0)
    world.renderer.frame(x, y, z, APC, 150.0)
    again = world.renderer.frame(x, y, z, PE, 100.0)
    assert np.array_equal(first, again)
    # a new world from the same seed renders the same pixels
    twin = World(WorldConfig(seed=11), LAYOUT)
    assert np.array_equal(first, twin.renderer.frame(x, y, z, PE, 100.0))
    other = World(WorldConfig(seed=12), LAYOUT)
    assert not np.array_equal(first, other.renderer.frame(x, y, z, PE, 100.0))


def test_population_has_every_kind(world: World) -> None:
    kinds = {KINDS[k] for k in np.unique(world.objects.kind)}
    assert kinds == set(KINDS)
    ctc = world.objects.kind == KINDS.index("CTC")
    d = 2 * world.objects.cell_r[ctc]
    assert d.min() > 4.0  # CTCs are larger than 4 um by definition
    assert world.objects.cluster[ctc].max() >= 0  # some CTCs sit in clusters
    assert world.objects.marker[ctc].any() and world.objects.dim[ctc].any()
    small = world.objects.kind == KINDS.index("SMALL_CK_DAPI")
    assert (2 * world.objects.cell_r[small]).max() < 4.0


def test_ground_truth_objects_appear_where_rendered(world: World) -> None:
    x, y = _centre_field(world)
    z = world.surface_z(x, y)
    truth = world.ground_truth([("f", x, y)])["fields"][0]
    frames = {
        c: world.renderer.frame(x, y, z, c, e).astype(float)
        for c, e in [(DAPI, 20.0), (PE, 100.0), (APC, 150.0)]
    }
    bg = {c: np.median(f) for c, f in frames.items()}
    by_kind: dict[str, list[dict]] = {}
    for o in truth["objects"]:
        by_kind.setdefault(o["kind"], []).append(o)
    assert by_kind["CTC"] and by_kind["WBC"]

    def peak(c: int, o: dict) -> float:
        r, col = round(o["row"]), round(o["col"])
        win = frames[c][max(r - 3, 0) : r + 4, max(col - 3, 0) : col + 4]
        return float(win.max() - bg[c]) if win.size else 0.0

    for o in by_kind["CTC"]:
        assert peak(PE, o) > 40, o  # cytokeratin where the truth says a CTC is
        assert peak(DAPI, o) > 200, o  # and its nucleus
    for o in by_kind["WBC"][:30]:
        assert peak(DAPI, o) > 200, o
        assert peak(PE, o) < 40, o  # leukocytes carry no cytokeratin
    # random background points are dark in PE
    rng = np.random.default_rng(0)
    pts = rng.integers([0, 0], [world.height, world.width], (50, 2))
    assert np.median([frames[PE][r, c] - bg[PE] for r, c in pts]) < 10


def test_edge_field_shows_bright_rim_and_dark_outside(world: World) -> None:
    # first column of the grid: the wall runs vertically through the field
    x = LAYOUT.center_x_um - 2 * world.fov_w + world.fov_w / 2
    y = LAYOUT.center_y_um
    img = world.renderer.frame(x, y, world.surface_z(x, y), PE, 100.0).astype(float)
    wall_col = round(
        world.to_pixel(x, y, np.array([world.chamber[0]]), np.array([y]))[1][0]
    )
    assert 0 < wall_col < world.width
    mid = slice(world.height // 2 - 50, world.height // 2 + 50)
    rim = img[mid, wall_col - 2 : wall_col + 3].mean()
    outside = img[mid, : max(wall_col - 60, 1)].mean()
    inside = np.median(img[mid, wall_col + 100 :])
    assert rim > inside + 500  # the wall is bright
    assert outside < inside  # beyond the wall it is darker than the chamber
    assert world.ground_truth([("e", x, y)])["fields"][0]["edge"]


def _sharpness(img: np.ndarray) -> float:
    return float(ndimage.laplace(img.astype(float)).var())


def test_blur_grows_off_focus(world: World) -> None:
    x, y = _centre_field(world)
    z0 = world.surface_z(x, y)
    sharp = [
        _sharpness(world.renderer.frame(x, y, z0 + dz, DAPI, 20.0)[200:600, 200:700])
        for dz in (0.0, 3.0, 6.0, 12.0)
    ]
    assert sharp == sorted(sharp, reverse=True)
    assert sharp[-1] < 0.3 * sharp[0]
    # symmetric: below focus blurs like above
    below = _sharpness(
        world.renderer.frame(x, y, z0 - 6.0, DAPI, 20.0)[200:600, 200:700]
    )
    assert below == pytest.approx(sharp[2], rel=0.15)


def test_surface_is_tilted_and_bowed() -> None:
    w = World(
        WorldConfig(
            surface={"tilt_x_um_per_mm": 1.0, "tilt_y_um_per_mm": 0.0, "bow_um": 0.0}
        ),
        get_layout("cellsearch-5x35"),
    )
    assert w.surface_z(1000, 0) - w.surface_z(0, 0) == pytest.approx(1.0)
    bowed = World(
        WorldConfig(
            surface={"tilt_x_um_per_mm": 0.0, "tilt_y_um_per_mm": 0.0, "bow_um": 3.0}
        ),
        get_layout("cellsearch-5x35"),
    )
    assert bowed.surface_z(0, 0) - bowed.surface_z(
        bowed.chamber[1], 0
    ) == pytest.approx(3.0)


def test_camera_physics(world: World) -> None:
    x, y = _centre_field(world)
    z = world.surface_z(x, y)
    opt = world.config.optics
    a = world.renderer.frame(x, y, z, FITC, 50.0).astype(float)
    b = world.renderer.frame(x, y, z, FITC, 100.0).astype(float)
    # signal above the offset is proportional to exposure
    ratio = (np.median(b) - opt.offset_dn) / (np.median(a) - opt.offset_dn)
    assert ratio == pytest.approx(2.0, rel=0.05)
    # vignetting: the centre is brighter than the corners
    h, w = a.shape
    centre = np.median(b[h // 2 - 50 : h // 2 + 50, w // 2 - 50 : w // 2 + 50])
    corner = np.median(b[:100, :100])
    assert corner < centre
    # 12-bit range, saturation at 4095
    hot = world.renderer.frame(x, y, z, DAPI, 2000.0)
    assert hot.max() == 2**opt.bit_depth - 1
    # closed shutter: offset and read noise only
    dark = world.renderer.frame(x, y, z, -1, 100.0).astype(float)
    assert abs(dark.mean() - opt.offset_dn) < 1
    assert dark.std() == pytest.approx(opt.read_noise_dn, rel=0.1)
    # shot noise: variance grows with signal
    assert np.var(np.diff(b[400:600, 400:600], axis=1)) > np.var(
        np.diff(dark[400:600, 400:600], axis=1)
    )


def test_devices_through_unimmcore_share_the_world() -> None:
    world = World(WorldConfig(seed=5), LAYOUT)
    core = open_simulated_core(CONFIG_DIR / "simulated.cfg", world)
    try:
        assert core.getImageWidth() == 1384 and core.getImageHeight() == 1036
        assert sorted(core.getAvailableConfigs("Channel")) == sorted(STAINS)
        core.setXYPosition(100.0, -50.0)
        core.setZPosition(1.5)
        core.setConfig("Channel", "PE")
        assert world.xy == (100.0, -50.0) and world.z == 1.5
        assert world.channel == STAINS.index("PE")
        core.setExposure(100)
        core.setShutterOpen(True)
        core.snapImage()
        img = core.getImage()
        assert np.array_equal(img, world.renderer.frame(100.0, -50.0, 1.5, 2, 100.0))
        with pytest.raises(ValueError, match="outside stage travel"):
            core.setXYPosition(1e6, 0)  # beyond stage travel
    finally:
        core.unloadAllDevices()


@pytest.mark.parametrize("dz", [0.0, 1.0, 6.0])
@pytest.mark.parametrize(
    "roi",
    [(436, 262, 512, 512), (0, 0, 300, 200), (1000, 800, 384, 236)],
    ids=["centre", "corner", "far-corner"],
)
def test_an_roi_frame_is_that_region_of_the_full_frame(
    world: World, roi: tuple[int, int, int, int], dz: float
) -> None:
    # an edge field (wall and rim) and a defocus whose blur crosses the ROI edge
    x = LAYOUT.center_x_um - 1.5 * world.fov_w
    y = LAYOUT.center_y_um + world.fov_h
    z = world.surface_z(x, y) + dz
    fresh = World(WorldConfig(seed=11), LAYOUT)  # nothing cached from the full frame
    part = fresh.renderer.frame(x, y, z, DAPI, 20.0, roi=roi)
    full = world.renderer.frame(x, y, z, DAPI, 20.0)
    c, r, w, h = roi
    assert part.shape == (h, w)
    assert np.array_equal(part, full[r : r + h, c : c + w])


def test_the_camera_honours_setroi_and_the_clock_counts_instrument_time() -> None:
    world = World(WorldConfig(seed=5), LAYOUT)
    core = open_simulated_core(CONFIG_DIR / "simulated.cfg", world)
    try:
        core.setXYPosition(100.0, -50.0)
        core.setZPosition(1.5)
        core.setConfig("Channel", "DAPI")
        core.setExposure(20)
        core.setShutterOpen(True)
        t0 = world.clock_ms
        core.setROI(436, 262, 512, 256)
        assert list(core.getROI()) == [436, 262, 512, 256]
        assert (core.getImageWidth(), core.getImageHeight()) == (512, 256)
        core.snapImage()
        img = core.getImage()
        assert img.shape == (256, 512)
        full = world.renderer.frame(100.0, -50.0, 1.5, 0, 20.0)
        assert np.array_equal(img, full[262:518, 436:948])
        assert world.clock_ms - t0 == pytest.approx(20.0)  # the exposure
        core.clearROI()
        core.snapImage()
        assert core.getImage().shape == (1036, 1384)
        # moves cost their travel: 2000 um at 20 um/ms, 4 um at 1 um/ms
        t0 = world.clock_ms
        core.setXYPosition(2100.0, -50.0)
        core.setZPosition(5.5)
        assert world.clock_ms - t0 == pytest.approx(100.0 + 4.0)
    finally:
        core.unloadAllDevices()


def test_devices_need_a_bound_world() -> None:
    from simulators.devices import SimCamera

    with pytest.raises(RuntimeError, match="open_simulated_core"):
        SimCamera()
