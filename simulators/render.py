"""Rendering of simulated frames: objects, cartridge wall, optics and camera.

A field's noise-free stain planes are rendered once per stage position and
cached; each snap then mixes the channel (crosstalk), blurs it by the defocus,
applies vignetting and exposure, adds shot and read noise and the camera offset,
and clips to the camera's bit depth. Noise comes from a fixed bank of normals
read at an offset hashed from (position, z, channel, exposure), so the same frame
is always the same pixels, cheaply.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

from simulators.config import WorldConfig

__all__ = ["Renderer", "Scene"]


class Scene(Protocol):
    """What the renderer needs of a world (`simulators.world.World`)."""

    config: WorldConfig
    width: int
    height: int
    pixel_size_um: float
    fov_w: float
    fov_h: float
    chamber: tuple[float, float, float, float]
    objects: Any
    rotation: float

    def surface_z(self, x: float, y: float) -> float: ...
    def frame_origin(self, x: float, y: float) -> tuple[float, float]: ...
    def to_pixel(self, fx: float, fy: float, x: Any, y: Any) -> Any: ...
    def offset_px(self, dx: Any, dy: Any) -> tuple[Any, Any]: ...
    def to_stage(self, fx: float, fy: float, rows: Any, cols: Any) -> Any: ...
    def noise_offset(self, *key: float | int, span: int) -> int: ...


_TEX = 256  # side of the texture bank
_EDGE_PX = 1.2  # soft edge of every drawn shape, ~ in-focus PSF of 10x/0.45
_ROI_MARGIN_PX = 64  # drawn around an ROI, so snaps at other z reuse the drawing
_BLOCK_PX = 1 << 15  # pixels per block of rows a frame is finished in


def _holds(box: tuple[int, int, int, int], inner: tuple[int, int, int, int]) -> bool:
    return (
        box[0] <= inner[0]
        and inner[1] <= box[1]
        and box[2] <= inner[2]
        and inner[3] <= box[3]
    )


def _smoothstep(t: np.ndarray) -> np.ndarray:
    np.clip(t, 0.0, 1.0, out=t)
    return t * t * (3.0 - 2.0 * t)


class Renderer:
    """Renders frames of one `World`; holds the precomputed maps and a field cache."""

    def __init__(self, world: Scene) -> None:
        self.world = world
        h, w = world.height, world.width
        opt = world.config.optics
        rng = np.random.default_rng([world.config.seed, 2])
        self.noise = rng.standard_normal(h * w * 3, dtype=np.float32)
        tex = ndimage.gaussian_filter(rng.standard_normal((_TEX, _TEX)), 1.5)
        tex = 1.0 + 0.45 * tex / tex.std()  # granular CK texture, mean 1
        self.texture = np.clip(tex, 0.2, 2.0).astype(np.float32)
        rr = (np.arange(h, dtype=np.float32) - (h - 1) / 2)[:, None]
        cc = (np.arange(w, dtype=np.float32) - (w - 1) / 2)[None, :]
        r2 = (rr * rr + cc * cc) / ((h / 2) ** 2 + (w / 2) ** 2)
        self.vignette = (1.0 - opt.vignetting * r2).astype(np.float32)
        self.max_dn = float(2**opt.bit_depth - 1)
        self._cache_key: tuple[float, float] | None = None
        # (box drawn, stain planes, inside, rim) of the last position
        self._cache: tuple[Any, ...] | None = None
        self._lock = threading.Lock()
        self._extent = world.objects.extent_um()

    # ------------------------------------------------------------------ public

    def frame(
        self,
        x: float,
        y: float,
        z: float,
        channel: int,
        exposure_ms: float,
        out: np.ndarray | None = None,
        roi: tuple[int, int, int, int] | None = None,
    ) -> np.ndarray:
        """A camera frame (height, width) uint16 at stage (x, y, z).

        `channel` is the filter position (index into the world's stains), or -1
        for a closed shutter (a dark frame: offset and read noise only). `roi`
        (x, y, width, height in pixels, Micro-Manager's order) renders only that
        part of the sensor: the same pixels as that region of the full frame,
        at a fraction of the cost.
        """
        w = self.world
        opt = w.config.optics
        cx0, ry0, cw, rh = (0, 0, w.width, w.height) if roi is None else roi
        clean: np.ndarray | None = None  # blurred, or
        planes: tuple[Any, ...] | None = None  # mixed a block of rows at a time
        if channel >= 0 and exposure_ms > 0:
            sigma = math.hypot(
                self.defocus_sigma_px(z - w.surface_z(x, y)), self.field_blur_px(x, y)
            )
            if sigma > 0.1:
                # the blur reaches int(3 sigma + 0.5) px (truncate=3): render
                # that much around the ROI so its pixels match the full frame's
                pad = int(3.0 * sigma + 0.5) + 1
                r0, c0 = max(ry0 - pad, 0), max(cx0 - pad, 0)
                box = (
                    r0,
                    min(ry0 + rh + pad, w.height),
                    c0,
                    min(cx0 + cw + pad, w.width),
                )
                clean = ndimage.gaussian_filter(
                    self._channel_image(x, y, channel, box),
                    sigma,
                    mode="nearest",
                    truncate=3.0,
                )
                clean = clean[ry0 - r0 : ry0 - r0 + rh, cx0 - c0 : cx0 - c0 + cw]
            else:
                planes = self._field_planes(x, y, (ry0, ry0 + rh, cx0, cx0 + cw))
        npix = w.height * w.width
        start = w.noise_offset(
            round(x, 2),
            round(y, 2),
            round(z, 3),
            channel,
            round(exposure_ms, 3),
            span=self.noise.size - npix,
        )
        noise = self.noise[start : start + npix].reshape(w.height, w.width)
        noise = noise[ry0 : ry0 + rh, cx0 : cx0 + cw]
        vignette = self.vignette[ry0 : ry0 + rh, cx0 : cx0 + cw]
        if out is None:
            out = np.empty((rh, cw), np.uint16)
        # element by element, a block of rows at a time: the same float32
        # operations as on the whole frame (the same pixels), with the block's
        # temporaries in the CPU's cache instead of a dozen passes over memory
        k_dn = np.float32(1.0 / opt.electrons_per_dn)
        read2 = np.float32(opt.read_noise_dn**2)
        offset = np.float32(opt.offset_dn + 0.5)
        exposure = np.float32(exposure_ms)
        step = max(1, _BLOCK_PX // max(cw, 1))
        for a in range(0, rh, step):
            rows = slice(a, min(a + step, rh))
            if clean is not None or planes is not None:
                if clean is not None:
                    c = clean[rows]
                else:
                    stains, inside, rim = planes  # type: ignore[misc]
                    c = self._mix(
                        channel,
                        stains[:, rows],
                        None if inside is None else inside[rows],
                        None if rim is None else rim[rows],
                    )
                signal = np.multiply(c, vignette[rows])
                signal *= exposure
            else:
                signal = np.zeros((rows.stop - a, cw), np.float32)
            sd = signal * k_dn
            sd += read2
            np.sqrt(sd, out=sd)
            sd *= noise[rows]
            signal += sd
            signal += offset
            np.clip(signal, 0.0, self.max_dn, out=signal)
            np.copyto(out[rows], signal, casting="unsafe")
        return out

    def defocus_sigma_px(self, dz_um: float) -> float:
        """Extra blur (Gaussian sigma, px) of a frame taken `dz_um` off focus.

        Smooth and symmetric: ``blur * (sqrt(dz^2 + d^2) - d)`` with ``d`` half the
        depth of field, so the blur grows quadratically within the depth of field
        and linearly (``blur`` px per um) beyond it.
        """
        opt = self.world.config.optics
        d = opt.depth_of_field_um / 2
        return opt.blur_px_per_um * (math.hypot(dz_um, d) - d)

    def field_blur_px(self, x: float, y: float) -> float:
        """Extra blur (Gaussian sigma, px) of the field at stage (x, y), drawn from
        `optics.field_blur_px` by the position alone (0 by default)."""
        lo, hi = self.world.config.optics.field_blur_px
        if hi <= 0:
            return 0.0
        u = self.world.noise_offset(round(x, 1), round(y, 1), -7, span=1 << 20)
        return lo + (hi - lo) * u / (1 << 20)

    # ------------------------------------------------------------------ internals

    def _channel_image(
        self, x: float, y: float, channel: int, box: tuple[int, int, int, int]
    ) -> np.ndarray:
        """Noise-free image of one channel in DN per ms (before vignetting), of
        the frame's rows box[0]:box[1] and columns box[2]:box[3]."""
        return self._mix(channel, *self._field_planes(x, y, box))

    def _mix(
        self,
        channel: int,
        stains: np.ndarray,
        inside: np.ndarray | None,
        rim: np.ndarray | None,
    ) -> np.ndarray:
        """One channel's image (DN per ms) from the stain planes, the chamber
        mask and the rim band: crosstalk, background, wall."""
        opt = self.world.config.optics
        img = np.zeros(stains.shape[1:], np.float32)
        for s, frac in enumerate(opt.crosstalk[channel]):
            if frac:
                img += np.float32(frac * opt.stain_rate[s]) * stains[s]
        bg = np.float32(opt.background_rate[channel])
        img += bg if inside is None else bg * inside
        if rim is not None:
            img += np.float32(opt.rim_rate[channel]) * rim
        return img

    def prepare(self, x: float, y: float) -> None:
        """Draw the whole frame's scene at stage (x, y) now (kept for the
        snaps there)."""
        self._field_planes(x, y, (0, self.world.height, 0, self.world.width))

    def _field_planes(
        self, x: float, y: float, box: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        key = (round(x, 3), round(y, 3))
        with self._lock:
            cached = self._cache if self._cache_key == key else None
        r0, r1, c0, c1 = box
        if cached is None or not _holds(cached[0], box):
            h, w = self.world.height, self.world.width
            if box != (0, h, 0, w):  # part of the frame: room for other blurs
                m = _ROI_MARGIN_PX
                box = (max(r0 - m, 0), min(r1 + m, h), max(c0 - m, 0), min(c1 + m, w))
            with self._lock:  # not two fields' planes at once (33 MB each)
                self._cache_key, self._cache = None, None
            cached = (box, self._draw_objects(x, y, box), *self._wall(x, y, box))
            with self._lock:
                self._cache_key, self._cache = key, cached
        (b0, _, b2, _), *planes = cached
        rows, cols = slice(r0 - b0, r1 - b0), slice(c0 - b2, c1 - b2)
        stains, inside, rim = planes
        return (
            stains[:, rows, cols],
            None if inside is None else inside[rows, cols],
            None if rim is None else rim[rows, cols],
        )

    def _wall(
        self, x: float, y: float, box: tuple[int, int, int, int]
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Background mask (1 inside the chamber, dim outside) and the rim band,
        of the frame's rows box[0]:box[1] and columns box[2]:box[3].

        Both are built from 1-D profiles along x and y (outer products), which is
        exact along the walls and cheap; only edge fields pay for them. A turned
        camera sees the walls askew: `_wall_turned`.
        """
        w = self.world
        if w.rotation:
            return self._wall_turned(x, y, box)
        opt = w.config.optics
        x0, y0 = w.frame_origin(x, y)
        px = w.pixel_size_um
        xs = x0 + px * np.arange(w.width, dtype=np.float64)
        ys = y0 - px * np.arange(w.height, dtype=np.float64)
        x_min, x_max, y_min, y_max = w.chamber
        dx = np.minimum(xs - x_min, x_max - xs).astype(np.float32)  # um, + inside
        dy = np.minimum(ys - y_min, y_max - ys).astype(np.float32)
        near = 2 * opt.rim_width_um
        x_near, y_near = dx.min() <= near, dy.min() <= near  # of the whole frame
        if not (x_near or y_near):
            return None, None
        dx, dy = dx[box[2] : box[3]], dy[box[0] : box[1]]
        half = np.float32(opt.rim_width_um / 2)

        def inside_1d(d: np.ndarray) -> np.ndarray:
            return np.clip(0.5 + d / np.float32(2 * px), 0, 1)

        def rim_1d(d: np.ndarray) -> np.ndarray:
            return np.clip(1 - np.abs(d) / half, 0, 1)

        ix, iy = inside_1d(dx), inside_1d(dy)
        inside = np.outer(iy, ix)
        ob = np.float32(opt.outside_background)
        inside *= 1 - ob
        inside += ob
        # a wall's band runs along the wall, up to the corner (+ half its width)
        along_y = np.clip(0.5 + (dy + half) / np.float32(2 * px), 0, 1)
        along_x = np.clip(0.5 + (dx + half) / np.float32(2 * px), 0, 1)
        rim = None
        if x_near:
            rim = np.outer(along_y, rim_1d(dx))
        if y_near:
            horiz = np.outer(rim_1d(dy), along_x)
            rim = horiz if rim is None else np.maximum(rim, horiz, out=rim)
        return inside, rim

    def _wall_turned(
        self, x: float, y: float, box: tuple[int, int, int, int]
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """`_wall` for a camera turned to the stage: the same profiles, of each
        pixel's own stage position."""
        w = self.world
        opt = w.config.optics
        px = w.pixel_size_um
        x_min, x_max, y_min, y_max = w.chamber
        near = 2 * opt.rim_width_um
        corners = w.to_stage(
            x,
            y,
            np.array([0, 0, w.height - 1, w.height - 1]),
            np.array([0, w.width - 1, 0, w.width - 1]),
        )
        cx, cy = corners
        x_near = min((cx - x_min).min(), (x_max - cx).min()) <= near
        y_near = min((cy - y_min).min(), (y_max - cy).min()) <= near
        if not (x_near or y_near):
            return None, None
        rows = np.arange(box[0], box[1], dtype=np.float64)[:, None]
        cols = np.arange(box[2], box[3], dtype=np.float64)[None, :]
        xs, ys = w.to_stage(x, y, rows, cols)
        dx = np.minimum(xs - x_min, x_max - xs).astype(np.float32)  # um, + inside
        dy = np.minimum(ys - y_min, y_max - ys).astype(np.float32)
        half = np.float32(opt.rim_width_um / 2)
        inside = np.clip(0.5 + dx / np.float32(2 * px), 0, 1)
        inside *= np.clip(0.5 + dy / np.float32(2 * px), 0, 1)
        ob = np.float32(opt.outside_background)
        inside *= 1 - ob
        inside += ob
        rim = None
        if x_near:
            along_y = np.clip(0.5 + (dy + half) / np.float32(2 * px), 0, 1)
            rim = along_y * np.clip(1 - np.abs(dx) / half, 0, 1)
        if y_near:
            along_x = np.clip(0.5 + (dx + half) / np.float32(2 * px), 0, 1)
            horiz = np.clip(1 - np.abs(dy) / half, 0, 1) * along_x
            rim = horiz if rim is None else np.maximum(rim, horiz, out=rim)
        return inside, rim

    def _draw_objects(
        self, x: float, y: float, box: tuple[int, int, int, int]
    ) -> np.ndarray:
        """Stain planes (4, rows, cols) of all objects touching the frame's rows
        box[0]:box[1] and columns box[2]:box[3]."""
        w = self.world
        o = w.objects
        px = w.pixel_size_um
        h, wd = w.height, w.width
        R0, R1, C0, C1 = box
        planes = np.zeros((4, R1 - R0, C1 - C0), np.float32)
        # a turned camera's corners reach beyond its axis-aligned frame
        turn = math.sin(abs(w.rotation)) * max(w.fov_w, w.fov_h) / 2
        reach = self._extent + 2 * px + turn
        sel = np.flatnonzero(
            (np.abs(o.x - x) <= w.fov_w / 2 + reach)
            & (np.abs(o.y - y) <= w.fov_h / 2 + reach)
        )
        rows, cols = w.to_pixel(x, y, o.x[sel], o.y[sel])
        if box != (0, h, 0, wd):  # only the objects that reach the box
            r = self._extent[sel] / px + 2 * _EDGE_PX + 3
            near = (
                (rows + r >= R0) & (rows - r < R1) & (cols + r >= C0) & (cols - r < C1)
            )
            sel, rows, cols = sel[near], rows[near], cols[near]
        tex = self.texture
        for j, i in enumerate(sel):
            rc, cc = float(rows[j]), float(cols[j])
            ext = float(self._extent[i]) / px
            half = math.ceil(ext + 2 * _EDGE_PX)
            r0, r1 = max(0, int(rc) - half), min(h, int(rc) + half + 2)
            c0, c1 = max(0, int(cc) - half), min(wd, int(cc) + half + 2)
            if r0 >= r1 or c0 >= c1:
                continue
            bh, bw = r1 - r0, c1 - c0
            t = int(o.texture[i])
            tr, tc = t % (_TEX - bh), (t // _TEX) % (_TEX - bw)
            # the texture's offset follows the object's box in the whole frame;
            # the drawn box cuts it further
            a0, a1, b0, b1 = max(r0, R0), min(r1, R1), max(c0, C0), min(c1, C1)
            if a0 >= a1 or b0 >= b1:
                continue
            tx = tex[tr + a0 - r0 : tr + a1 - r0, tc + b0 - c0 : tc + b1 - c0]
            r0, r1, c0, c1 = a0 - R0, a1 - R0, b0 - C0, b1 - C0
            yy = np.arange(a0, a1, dtype=np.float32)[:, None] - np.float32(rc)
            xx = np.arange(b0, b1, dtype=np.float32)[None, :] - np.float32(cc)
            amp = o.amp[i]
            nuc = None
            if o.nuc_r[i] > 0:
                nr = float(o.nuc_r[i]) / px
                if w.rotation:  # the nucleus' offset, turned with the camera
                    n_dr, n_dc = w.offset_px(float(o.nuc_dx[i]), float(o.nuc_dy[i]))
                    ny, nx = yy - np.float32(n_dr), xx - np.float32(n_dc)
                else:
                    ny = yy + np.float32(o.nuc_dy[i] / px)
                    nx = xx - np.float32(o.nuc_dx[i] / px)
                rho = np.sqrt(ny * ny + nx * nx)
                nuc = _smoothstep((np.float32(nr) - rho) / np.float32(_EDGE_PX))
                chromatin = 0.8 + 0.2 * tx
                planes[0, r0:r1, c0:c1] += np.float32(amp[0]) * nuc * chromatin
            if o.cell_r[i] <= 0:
                continue
            cr = float(o.cell_r[i]) / px
            angle = o.angle[i] + w.rotation  # in the camera's frame
            ca, sa = math.cos(angle), math.sin(angle)
            u = xx * np.float32(ca) + yy * np.float32(sa)
            v = (yy * np.float32(ca) - xx * np.float32(sa)) / np.float32(o.ratio[i])
            rho = np.sqrt(u * u + v * v)
            body = _smoothstep((np.float32(cr) - rho) / np.float32(_EDGE_PX))
            membrane = nuc is not None  # cells: CD45 / marker on the membrane
            if membrane:
                ring = np.clip(
                    1 - np.abs(rho - np.float32(cr - 1.0)) / np.float32(1.5), 0, 1
                )
            for s in (1, 2, 3):
                a = float(amp[s])
                if a <= 0:
                    continue
                if s == 2 or not membrane:  # cytokeratin / debris fill the body
                    shape = body * tx
                    if nuc is not None:
                        shape = shape * (1 - 0.35 * nuc)
                else:
                    shape = ring
                planes[s, r0:r1, c0:c1] += np.float32(a) * shape
            if not membrane and amp[0] > 0:  # debris glows in DAPI too
                planes[0, r0:r1, c0:c1] += np.float32(amp[0]) * body * tx
        return planes
