"""The simulated world: a seeded synthetic cartridge with ground truth.

Every device of the simulated instrument shares one `World`. It holds the
cartridge (objects drawn once from the seed), the focus surface, and the state the
devices set (stage position, focus, filter, shutter). Pixels of a frame depend only
on the seed, the stage position, z, channel and exposure, never on what was imaged
before, so a re-acquired field is identical.

Coordinates: stage x grows with image column, stage y shrinks with image row (row 0
of a frame is at its largest y, as in useq's grid), the camera turned by
`camera_rotation_deg` (counter-clockwise on the stage). Objects are stored in
stage um.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from controller.layouts import CartridgeLayout
from simulators.config import STAINS, WorldConfig
from simulators.render import Renderer

__all__ = ["KINDS", "ObjectTable", "World", "current_world"]

#: Object kinds; the first is the real thing, the rest are look-alikes.
KINDS: tuple[str, ...] = (
    "CTC",
    "WBC",
    "DOUBLE_POSITIVE",
    "CK_FRAGMENT",
    "SMALL_CK_DAPI",
    "NUCLEUS_BESIDE_CK",
    "FREE_NUCLEUS",
    "DEBRIS",
)
K = {name: i for i, name in enumerate(KINDS)}

_BOUND: contextvars.ContextVar[World | None] = contextvars.ContextVar(
    "ctcscan_sim_world", default=None
)


def current_world() -> World:
    """The world bound by `World.bound()`; simulated devices attach to it."""
    world = _BOUND.get()
    if world is None:
        raise RuntimeError(
            "simulated devices need a simulated world: load the config through "
            "simulators.open_simulated_core(), which binds one"
        )
    return world


@dataclass
class ObjectTable:
    """Columns of all objects of the cartridge (length N each).

    Radii and offsets in um; amplitudes per stain (DAPI, FITC, PE, APC) in units of
    the stain's rate; `ring` marks membrane (CD45 / marker) staining.
    """

    kind: np.ndarray  # int8
    x: np.ndarray
    y: np.ndarray
    cell_r: np.ndarray  # 0: no cell body (free nucleus)
    nuc_r: np.ndarray  # 0: no nucleus (fragment)
    nuc_dx: np.ndarray
    nuc_dy: np.ndarray
    ratio: np.ndarray  # minor/major axis ratio of the cell
    angle: np.ndarray
    amp: np.ndarray  # (N, 4)
    texture: np.ndarray  # texture offset index
    cluster: np.ndarray  # -1: single
    dim: np.ndarray  # bool
    marker: np.ndarray  # bool, FITC marker positive

    def __len__(self) -> int:
        return len(self.kind)

    @staticmethod
    def concat(parts: Sequence[ObjectTable]) -> ObjectTable:
        cols = {
            f: np.concatenate([getattr(p, f) for p in parts])
            for f in ObjectTable.__dataclass_fields__
        }
        return ObjectTable(**cols)

    def extent_um(self) -> np.ndarray:
        """Radius (um) that bounds each object's footprint."""
        nuc_reach = self.nuc_r + np.hypot(self.nuc_dx, self.nuc_dy)
        return np.maximum(self.cell_r, nuc_reach)


def _table(kind: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Empty-ish columns for n objects of one kind."""
    return {
        "kind": np.full(n, K[kind], np.int8),
        "x": np.zeros(n),
        "y": np.zeros(n),
        "cell_r": np.zeros(n),
        "nuc_r": np.zeros(n),
        "nuc_dx": np.zeros(n),
        "nuc_dy": np.zeros(n),
        "ratio": rng.uniform(0.8, 1.0, n),
        "angle": rng.uniform(0, math.pi, n),
        "amp": np.zeros((n, 4)),
        "texture": rng.integers(0, 2**31 - 1, n),
        "cluster": np.full(n, -1, np.int32),
        "dim": np.zeros(n, bool),
        "marker": np.zeros(n, bool),
    }


class World:
    """A simulated cartridge on a simulated microscope.

    Parameters
    ----------
    config : WorldConfig
        Seed, population, optics and focus surface.
    layout : CartridgeLayout
        The cartridge's field grid; the chamber wall lies `wall_inset_um` inside
        the outer fields.
    width, height : int
        Camera frame size in pixels.
    pixel_size_um : float
        Size of one camera pixel in the sample plane.
    """

    def __init__(
        self,
        config: WorldConfig,
        layout: CartridgeLayout,
        *,
        width: int = 1384,
        height: int = 1036,
        pixel_size_um: float = 0.64,
    ) -> None:
        self.width, self.height = width, height
        self.pixel_size_um = pixel_size_um
        self.fov_w = width * pixel_size_um
        self.fov_h = height * pixel_size_um
        self._set_sample(config, layout)
        # device state, guarded because devices are called from several threads
        self.lock = threading.RLock()
        self.xy = (layout.center_x_um, layout.center_y_um)
        self.z = config.surface.z0_um
        self.channel = 0
        self.shutter_open = False
        self.snap_failures_pending = 0
        self.snaps = 0
        self.autofocus_calls = 0
        self.filter_moves = 0
        self._filter_target = self.channel
        self._filter_stuck_until = 0.0
        self.xy_moves = 0
        self.last_frame: np.ndarray | None = None
        #: modelled instrument time (ms): every exposure and move, at any time_scale
        self.clock_ms = 0.0

    def _set_sample(self, config: WorldConfig, layout: CartridgeLayout) -> None:
        """Draw the cartridge: objects from the seed, chamber, renderer."""
        self.config = config
        self.layout = layout
        #: the camera's rotation to the stage axes (radians)
        self.rotation = math.radians(config.camera_rotation_deg)
        half_w = layout.cols * self.fov_w / 2
        half_h = layout.rows * self.fov_h / 2
        inset = layout.wall_inset_um
        cx, cy = layout.center_x_um, layout.center_y_um
        #: chamber (inner cartridge surface) as x_min, x_max, y_min, y_max in um
        self.chamber = (
            cx - half_w + inset,
            cx + half_w - inset,
            cy - half_h + inset,
            cy + half_h - inset,
        )
        self.objects = self._populate()
        self.renderer = Renderer(self)
        # the stage reaches 2 mm around every cartridge put on it (a holder's
        # cartridges all fit on one stage)
        margin = 2000.0
        reach = (
            cx - half_w - margin,
            cx + half_w + margin,
            cy - half_h - margin,
            cy + half_h + margin,
        )
        old = getattr(self, "travel", reach)
        self.travel = (
            min(old[0], reach[0]),
            max(old[1], reach[1]),
            min(old[2], reach[2]),
            max(old[3], reach[3]),
        )

    def load_cartridge(self, config: WorldConfig, layout: CartridgeLayout) -> None:
        """Another cartridge on the same microscope (a loader's next slot):
        a new sample and fault script; the stage stays where it is."""
        with self.lock:
            self._set_sample(config, layout)
            self.snap_failures_pending = 0
            self.snaps = self.autofocus_calls = self.filter_moves = 0
            self.xy_moves = 0
            self.last_frame = None

    # ------------------------------------------------------------------ binding

    @contextlib.contextmanager
    def bound(self) -> Iterator[World]:
        """Within this block, simulated devices created attach to this world."""
        token = _BOUND.set(self)
        try:
            yield self
        finally:
            _BOUND.reset(token)

    # ------------------------------------------------------------------ geometry

    def surface_z(self, x: float, y: float) -> float:
        """True focus z (um) of the cartridge surface at stage (x, y)."""
        s = self.config.surface
        cx, cy = self.layout.center_x_um, self.layout.center_y_um
        half_len = max(self.chamber[1] - cx, 1.0)
        u = (x - cx) / half_len
        return (
            s.z0_um
            + s.tilt_x_um_per_mm * (x - cx) / 1000
            + s.tilt_y_um_per_mm * (y - cy) / 1000
            + s.bow_um * (1 - u * u)
        )

    def frame_origin(self, x: float, y: float) -> tuple[float, float]:
        """Stage coordinates of pixel (0, 0) of a frame centred at (x, y)."""
        px = self.pixel_size_um
        return (x - (self.width - 1) / 2 * px, y + (self.height - 1) / 2 * px)

    def to_pixel(
        self, fx: float, fy: float, x: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) in a frame centred at (fx, fy) of stage points (x, y)."""
        if self.rotation:
            dr, dc = self.offset_px(x - fx, y - fy)
            return dr + (self.height - 1) / 2, dc + (self.width - 1) / 2
        x0, y0 = self.frame_origin(fx, fy)
        return (y0 - y) / self.pixel_size_um, (x - x0) / self.pixel_size_um

    def offset_px(self, dx: Any, dy: Any) -> tuple[Any, Any]:
        """(rows, cols) a stage offset (dx, dy) um spans in a frame.

        The camera turned by ``t`` maps a pixel offset (col, row) to the stage
        offset ``p (col cos t + row sin t, col sin t - row cos t)`` (pixel size
        ``p``: Micro-Manager's affine ``(p cos t, p sin t, 0, p sin t,
        -p cos t, 0)``); this is its inverse.
        """
        c, s, p = math.cos(self.rotation), math.sin(self.rotation), self.pixel_size_um
        return (dx * s - dy * c) / p, (dx * c + dy * s) / p

    def to_stage(self, fx: float, fy: float, rows: Any, cols: Any) -> tuple[Any, Any]:
        """Stage (x, y) of pixels (rows, cols) of a frame centred at (fx, fy)."""
        c, s, p = math.cos(self.rotation), math.sin(self.rotation), self.pixel_size_um
        dr, dc = rows - (self.height - 1) / 2, cols - (self.width - 1) / 2
        return fx + p * (dc * c + dr * s), fy + p * (dc * s - dr * c)

    # ------------------------------------------------------------------ population

    def _populate(self) -> ObjectTable:
        cfg = self.config.population
        rng = np.random.default_rng([self.config.seed, 1])
        x_min, x_max, y_min, y_max = self.chamber
        margin = self.config.optics.rim_width_um + 15.0
        area_fields = ((x_max - x_min) * (y_max - y_min)) / (self.fov_w * self.fov_h)

        def place(n: int) -> tuple[np.ndarray, np.ndarray]:
            return (
                rng.uniform(x_min + margin, x_max - margin, n),
                rng.uniform(y_min + margin, y_max - margin, n),
            )

        parts = []

        # CTCs: lognormal size around the indication's median, nucleus inside
        n = cfg.ctc
        t = self._ctcs(n, rng)
        x, y = place(n)
        # small clusters of 2-5 touching CTCs
        n_clustered = round(n * cfg.ctc_cluster_fraction)
        i, cid = 0, 0
        while i < n_clustered - 1:
            size = min(int(rng.integers(2, 6)), n_clustered - i)
            r = t["cell_r"]
            for k in range(1, size):
                # touch a random earlier member, without overlapping any other
                for _ in range(50):
                    j = i + int(rng.integers(0, k))
                    ang = rng.uniform(0, 2 * math.pi)
                    step = (r[j] + r[i + k]) * cfg.ctc_cluster_spacing
                    nx, ny = x[j] + step * math.cos(ang), y[j] + step * math.sin(ang)
                    gap = np.hypot(x[i : i + k] - nx, y[i : i + k] - ny)
                    tight = min(0.9, cfg.ctc_cluster_spacing - 0.02)
                    if np.all(gap >= (r[i : i + k] + r[i + k]) * tight):
                        break
                x[i + k], y[i + k] = nx, ny
            t["cluster"][i : i + size] = cid
            cid += 1
            i += size
        t["x"], t["y"] = x, y
        parts.append(t)
        if cfg.ctc_at:  # single CTCs at given places, from a stream of their own
            t = self._ctcs(
                len(cfg.ctc_at), np.random.default_rng([self.config.seed, 12])
            )
            t["x"] = np.array([p[0] for p in cfg.ctc_at], dtype=float)
            t["y"] = np.array([p[1] for p in cfg.ctc_at], dtype=float)
            parts.append(t)

        # leukocytes: DAPI nucleus, CD45 membrane ring, most CD45-dim
        n = int(rng.poisson(cfg.wbc_per_field * area_fields))
        t = _table("WBC", n, rng)
        t["cell_r"] = np.clip(rng.normal(9.4, 1.0, n), 7.0, 13.0) / 2
        t["nuc_r"] = t["cell_r"] * rng.uniform(0.6, 0.75, n)
        t["amp"][:, 0] = rng.uniform(0.5, 1.0, n)
        cd45_dim = rng.random(n) < cfg.wbc_cd45_dim_fraction
        t["amp"][:, 3] = np.where(
            cd45_dim, rng.uniform(0.25, 0.5, n), rng.uniform(0.5, 1.0, n)
        )
        t["x"], t["y"] = place(n)
        parts.append(t)

        # CK+/CD45+ double positives: leukocytes with non-specific CK staining
        n = cfg.double_positive
        t = _table("DOUBLE_POSITIVE", n, rng)
        t["cell_r"] = rng.uniform(8.0, 12.0, n) / 2
        t["nuc_r"] = t["cell_r"] * rng.uniform(0.55, 0.7, n)
        t["amp"][:, 0] = rng.uniform(0.5, 1.0, n)
        t["amp"][:, 2] = rng.uniform(0.3, 0.8, n)
        t["amp"][:, 3] = rng.uniform(0.5, 1.0, n)
        t["x"], t["y"] = place(n)
        parts.append(t)

        # CK+ fragments / vesicles without a nucleus, 1-10 um
        n = cfg.ck_fragment
        t = _table("CK_FRAGMENT", n, rng)
        t["cell_r"] = rng.uniform(1.0, 10.0, n) / 2
        t["ratio"] = rng.uniform(0.5, 1.0, n)
        t["amp"][:, 2] = rng.uniform(0.3, 1.0, n)
        t["x"], t["y"] = place(n)
        parts.append(t)

        # CK+ DAPI+ objects under 4 um
        n = cfg.small_ck_dapi
        t = _table("SMALL_CK_DAPI", n, rng)
        t["cell_r"] = rng.uniform(*cfg.small_ck_dapi_diameter_um, n) / 2
        t["nuc_r"] = t["cell_r"] * rng.uniform(0.55, 0.75, n)
        t["amp"][:, 0] = rng.uniform(0.5, 1.0, n)
        t["amp"][:, 2] = rng.uniform(0.4, 1.0, n)
        t["amp"] *= cfg.small_ck_dapi_brightness
        t["x"], t["y"] = place(n)
        parts.append(t)

        # a CK+ blob with a nucleus beside it (less than half inside)
        n = cfg.nucleus_beside_ck
        t = _table("NUCLEUS_BESIDE_CK", n, rng)
        t["cell_r"] = rng.uniform(8.0, 14.0, n) / 2
        t["ratio"] = np.ones(n)
        t["nuc_r"] = rng.uniform(3.0, 4.5, n)
        off = t["cell_r"] + t["nuc_r"] * rng.uniform(0.3, 0.9, n)
        phi = rng.uniform(0, 2 * math.pi, n)
        t["nuc_dx"], t["nuc_dy"] = off * np.cos(phi), off * np.sin(phi)
        t["amp"][:, 0] = rng.uniform(0.6, 1.0, n)
        t["amp"][:, 2] = rng.uniform(0.5, 1.0, n)
        t["x"], t["y"] = place(n)
        parts.append(t)

        # free nuclei: DAPI only
        n = int(rng.poisson(cfg.free_nucleus_per_field * area_fields))
        t = _table("FREE_NUCLEUS", n, rng)
        t["nuc_r"] = rng.uniform(6.0, 9.0, n) / 2
        t["amp"][:, 0] = rng.uniform(0.5, 1.0, n)
        t["x"], t["y"] = place(n)
        parts.append(t)

        # bright debris / crystals in every channel, often saturating
        n = cfg.debris
        t = _table("DEBRIS", n, rng)
        t["cell_r"] = rng.uniform(3.0, 25.0, n) / 2
        t["ratio"] = rng.uniform(0.3, 1.0, n)
        level = rng.uniform(1.5, 6.0, n)
        t["amp"][:] = level[:, None] * rng.uniform(0.6, 1.4, (n, 4))
        t["amp"][:, 0] *= 0.3  # DAPI rate is higher; keep debris comparable
        t["x"], t["y"] = place(n)
        parts.append(t)

        return ObjectTable.concat([ObjectTable(**p) for p in parts])

    def _ctcs(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`n` CTCs, all but their place: lognormal size around the indication's
        median, nucleus inside, some dim, some marker-positive."""
        cfg = self.config.population
        t = _table("CTC", n, rng)
        d = np.clip(cfg.ctc_median_diameter_um * rng.lognormal(0, 0.22, n), 6.0, 30.0)
        t["cell_r"] = d / 2
        t["ratio"] = rng.uniform(0.7, 1.0, n)
        t["nuc_r"] = t["cell_r"] * rng.uniform(0.5, 0.68, n)
        off = t["cell_r"] * rng.uniform(0, 0.18, n)
        phi = rng.uniform(0, 2 * math.pi, n)
        t["nuc_dx"], t["nuc_dy"] = off * np.cos(phi), off * np.sin(phi)
        t["dim"] = rng.random(n) < cfg.ctc_dim_fraction
        t["marker"] = rng.random(n) < cfg.ctc_fitc_fraction
        t["amp"][:, 0] = rng.uniform(0.6, 1.0, n)
        t["amp"][:, 2] = np.where(
            t["dim"], rng.uniform(*cfg.ctc_dim_ck, n), rng.uniform(0.5, 1.0, n)
        )
        t["amp"][:, 1] = np.where(t["marker"], rng.uniform(0.4, 0.9, n), 0.0)
        return t

    # ------------------------------------------------------------------ imaging

    def inject_snap_failures(self, n: int) -> None:
        """Make the next `n` snaps fail (fault injection for tests)."""
        with self.lock:
            self.snap_failures_pending = n

    def snap(
        self,
        exposure_ms: float,
        out: np.ndarray | None = None,
        roi: tuple[int, int, int, int] | None = None,
    ) -> np.ndarray:
        """Image the current state of the devices (only the camera's `roi`, x, y,
        width, height, when it has one); raise on an injected fault."""
        with self.lock:
            n = self.snaps
            self.snaps += 1
            if self.snap_failures_pending > 0 or n in self.config.fail_snaps:
                self.snap_failures_pending = max(0, self.snap_failures_pending - 1)
                raise RuntimeError(f"simulated camera: readout failed (snap {n})")
            (x, y), z, ch = self.xy, self.z, self.channel
            lit = self.shutter_open
            cfg = self.config
            hang = n in cfg.hang_snaps
            if n in cfg.stale_snaps and self.last_frame is not None:
                frame = self.last_frame.copy()
                if out is not None:
                    np.copyto(out, frame)
                return frame
        if hang:  # wall time, whatever the time scale
            time.sleep(cfg.hang_s)
        frame = self.renderer.frame(
            x,
            y,
            z,
            ch if lit and n not in cfg.black_snaps else -1,
            exposure_ms,
            out=out,
            roi=roi,
        )
        if n in cfg.saturated_snaps:
            frame[...] = self.renderer.max_dn
        if cfg.stale_snaps:  # only a world that replays frames keeps one
            with self.lock:
                self.last_frame = frame.copy()
        return frame

    def move_filter(self, position: int) -> None:
        """The filter cube is told to go to `position`.

        Changes of position are counted; a change listed in `stuck_filter`
        sticks: orders to that position are ignored for `stuck_filter_ms` of
        wall time (a jammed wheel that frees itself), whatever the exposure
        time scale.
        """
        with self.lock:
            now = time.monotonic()
            if position != self._filter_target:
                n = self.filter_moves
                self.filter_moves += 1
                self._filter_target = position
                if n in self.config.stuck_filter:
                    self._filter_stuck_until = now + self.config.stuck_filter_ms / 1000
            if now >= self._filter_stuck_until:
                self.channel = position

    def filter_position(self) -> int:
        with self.lock:
            return self.channel

    def autofocus(self) -> float:
        """A hardware full focus at the current stage position; returns the new z.

        Like a reflection autofocus, it finds the surface to within
        `autofocus_sd_um` (repeatable per position); configured calls fail or land
        `wrong_autofocus_um` off (locked onto the wrong interface).
        """
        cfg = self.config
        with self.lock:
            n = self.autofocus_calls
            self.autofocus_calls += 1
            x, y = self.xy
        if n in cfg.fail_autofocus:
            raise RuntimeError(f"simulated autofocus: no reflection signal (call {n})")
        key = (cfg.seed, 7, round(x * 100), round(y * 100))
        err = np.random.default_rng([int(k) % 2**32 for k in key]).normal(
            0.0, cfg.autofocus_sd_um
        )
        z = self.surface_z(x, y) + float(err)
        if n in cfg.wrong_autofocus:
            z += cfg.wrong_autofocus_um
        with self.lock:
            self.z = z
        return z

    def noise_offset(self, *key: float | int, span: int) -> int:
        """A deterministic offset in [0, span) for a frame described by `key`."""
        text = ",".join(
            f"{k:.4f}" if isinstance(k, float) else str(k)
            for k in (self.config.seed, *key)
        )
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % span

    # ------------------------------------------------------------------ truth

    def objects_in(self, x: float, y: float) -> np.ndarray:
        """Indices of objects whose centre lies in the frame centred at (x, y)."""
        o = self.objects
        return np.flatnonzero(
            (np.abs(o.x - x) <= self.fov_w / 2) & (np.abs(o.y - y) <= self.fov_h / 2)
        )

    def ground_truth(
        self, fields: Sequence[tuple[str, float, float]]
    ) -> dict[str, Any]:
        """Ground truth of the given fields (name, stage x, stage y).

        Returns a JSON-ready mapping: per field its true focus z and the objects
        whose centre lies in it, with (row, col) pixel position in the field.
        """
        o = self.objects
        out_fields = []
        counts = np.zeros(len(KINDS), dtype=np.int64)
        diameter = 2 * np.maximum(o.cell_r, o.nuc_r)
        for name, fx, fy in fields:
            idx = self.objects_in(fx, fy)
            rows, cols = self.to_pixel(fx, fy, o.x[idx], o.y[idx])
            kinds = o.kind[idx]
            counts += np.bincount(kinds, minlength=len(KINDS))
            objs = [
                {
                    "id": i,
                    "kind": KINDS[k],
                    "row": round(r, 1),
                    "col": round(c, 1),
                    "diameter_um": round(d, 2),
                    "cluster": cl,
                    "dim": dim,
                    "marker_positive": marker,
                }
                for i, k, r, c, d, cl, dim, marker in zip(
                    np.asarray(idx).tolist(),
                    kinds.tolist(),
                    np.asarray(rows, dtype=float).tolist(),
                    np.asarray(cols, dtype=float).tolist(),
                    diameter[idx].astype(float).tolist(),
                    o.cluster[idx].astype(int).tolist(),
                    o.dim[idx].astype(bool).tolist(),
                    o.marker[idx].astype(bool).tolist(),
                    strict=True,
                )
            ]
            out_fields.append(
                {
                    "name": name,
                    "x_um": fx,
                    "y_um": fy,
                    "z_true_um": round(self.surface_z(fx, fy), 3),
                    "edge": self._touches_wall(fx, fy),
                    "objects": objs,
                }
            )
        return {
            "seed": self.config.seed,
            "world": self.config.model_dump(mode="json"),
            "stains": list(STAINS),
            "pixel_size_um": self.pixel_size_um,
            "totals": dict(zip(KINDS, counts.tolist(), strict=True)),
            "fields": out_fields,
        }

    def _touches_wall(self, fx: float, fy: float) -> bool:
        x_min, x_max, y_min, y_max = self.chamber
        return not (
            x_min < fx - self.fov_w / 2
            and fx + self.fov_w / 2 < x_max
            and y_min < fy - self.fov_h / 2
            and fy + self.fov_h / 2 < y_max
        )
