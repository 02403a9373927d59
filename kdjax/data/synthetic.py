"""Procedural street scenes: the built-in dataset that needs no download.

A scene is a seeded random street seen by a pinhole camera: sky, facades along both sides with gaps of
vegetation, a backdrop at the end of the street, road and pavement, and objects standing on the ground
(cars with a visible side, people, thin poles with lamps and signs, trees, bins). Every pixel is found
by casting its ray into that world, so the scene is resolution-free: the same seed rendered at two
resolutions has the same layout, only sampled more finely.

Class cues are deliberately not colour alone. Overcast sky, facades, asphalt, pavement and cars share
greys; what separates them is texture in world coordinates (window grids, paving tiles, asphalt grain,
leaf noise), geometry and context. Exposure, colour temperature, cast shadows, haze that grows with
depth and sensor noise vary per scene, and small distant people and thin poles reward capacity.

Traffic signs, bins and the ego vehicle's bonnet are void (the ignore label), as in Cityscapes.
"""

from __future__ import annotations

import numpy as np

from kdjax.data.metadata import IGNORE_LABEL, DatasetInfo, register_dataset_info

CLASS_NAMES = ("sky", "building", "road", "pavement", "vegetation", "car", "pole", "person")
SKY, BUILDING, ROAD, PAVEMENT, VEGETATION, CAR, POLE, PERSON = range(len(CLASS_NAMES))

SYNTHETIC_INFO = DatasetInfo(
    name="synthetic",
    class_names=CLASS_NAMES,
    # Cityscapes colours of the same classes, so overlays read the same way.
    palette=np.array([(70, 130, 180), (70, 70, 70), (128, 64, 128), (244, 35, 232),
                      (107, 142, 35), (0, 0, 142), (153, 153, 153), (220, 20, 60)], np.uint8),
    ignore_label=IGNORE_LABEL,
    label_map=None,
    splits={"train": "train", "val": "val"},
)
register_dataset_info(SYNTHETIC_INFO)

# Height / width of the frame the scene is laid out for; other aspect ratios stretch it.
_NOMINAL_ASPECT = 0.5


def _hash01(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Pseudo-random float32 in [0, 1) for integer lattice points (uint32 arithmetic wraps on purpose)."""
    with np.errstate(over="ignore"):
        n = (ix.astype(np.uint32) * np.uint32(0x27D4EB2D) + iy.astype(np.uint32) * np.uint32(0x165667B1)
             + np.uint32(salt & 0xFFFFFFFF))
        n ^= n >> np.uint32(15)
        n *= np.uint32(0x2C1B3C6D)
        n ^= n >> np.uint32(12)
        n *= np.uint32(0x297A2D39)
        n ^= n >> np.uint32(15)
    return (n >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def value_noise(x: np.ndarray, y: np.ndarray, salt: int, octaves: int = 1) -> np.ndarray:
    """Smooth noise in [0, 1] at continuous coordinates, one lattice cell per unit.

    Being a function of (world) coordinates rather than of pixels is what keeps textures the same at
    every resolution. Octaves halve the cell size and the amplitude each time.
    """
    total = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        fx, fy = np.floor(x), np.floor(y)
        tx, ty = (x - fx).astype(np.float32), (y - fy).astype(np.float32)
        tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)
        ix, iy = fx.astype(np.int64), fy.astype(np.int64)
        s = salt + 7919 * octave
        top = _hash01(ix, iy, s) * (1 - tx) + _hash01(ix + 1, iy, s) * tx
        bottom = _hash01(ix, iy + 1, s) * (1 - tx) + _hash01(ix + 1, iy + 1, s) * tx
        total += amplitude * (top * (1 - ty) + bottom * ty)
        norm += amplitude
        amplitude *= 0.5
        x, y = x * 2.0, y * 2.0
    return total / norm


class _Scene:
    """Scene parameters drawn from one seed, then rendered by ray casting at any resolution."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.salt = int(rng.integers(1 << 31))
        # Camera: horizon row, vanishing column, focal length (in frame heights) and height above road.
        self.horizon = rng.uniform(0.36, 0.52)
        self.centre = rng.uniform(0.38, 0.62)
        self.focal = rng.uniform(0.8, 1.3)
        self.camera_height = rng.uniform(1.2, 1.8)
        # Street cross-section (metres, camera at x = 0): road between the curbs, pavement to the facades.
        road_centre = rng.uniform(-1.5, 1.5)
        half_road = rng.uniform(3.0, 6.5)
        self.curbs = (road_centre - half_road, road_centre + half_road)
        self.facades = (self.curbs[0] - rng.uniform(1.5, 4.5), self.curbs[1] + rng.uniform(1.5, 4.5))
        self.backdrop_depth = rng.uniform(60.0, 160.0)
        self.segments = [self._facade_segments(rng) for _ in range(2)]
        self._draw_appearance(rng)
        self.objects = self._place_objects(rng)

    # ---- layout -------------------------------------------------------------------------------------

    def _facade_segments(self, rng):
        """Facade segments along one side, nearest first, as arrays: start depths, is-building flags (else a
        vegetation gap), heights, base colours and window layouts (floor height, window period, window
        width and height as fractions)."""
        starts, kinds, heights, colours, floors = [], [], [], [], []
        z = 0.0
        while z < self.backdrop_depth:
            starts.append(z)
            building = rng.uniform() < 0.75
            kinds.append(building)
            heights.append(rng.uniform(6.0, 25.0) if building else rng.uniform(2.0, 9.0))
            colours.append(_facade_colour(rng))
            floors.append((rng.uniform(2.8, 3.8), rng.uniform(1.8, 4.0),
                           rng.uniform(0.25, 0.6), rng.uniform(0.3, 0.6)))
            z += rng.uniform(6.0, 28.0)
        return (np.array(starts, np.float32), np.array(kinds), np.array(heights, np.float32),
                np.array(colours, np.float32), np.array(floors, np.float32))

    def _draw_appearance(self, rng):
        sky_kind = rng.choice(3, p=[0.5, 0.35, 0.15])  # clear, overcast, dusk
        self.sky_top, self.sky_horizon = {
            0: (rng.uniform([20, 70, 150], [70, 120, 220]), rng.uniform([150, 180, 210], [200, 220, 250])),
            1: (rng.uniform([120, 120, 125], [170, 170, 180]), rng.uniform([170, 170, 175], [220, 220, 225])),
            2: (rng.uniform([40, 40, 100], [90, 80, 150]), rng.uniform([200, 120, 60], [250, 180, 120])),
        }[int(sky_kind)]
        self.cloud_cover = rng.uniform(0.0, 0.8)
        self.asphalt = rng.uniform(55, 125) + rng.uniform(-6, 6, 3)
        self.pavement = _pick(rng, [(150, 150, 150), (175, 165, 150), (150, 110, 100), (120, 120, 125)], 20)
        self.tile = rng.uniform(0.3, 0.9)
        self.grass = _pick(rng, [(70, 110, 40), (95, 120, 55), (60, 90, 50), (130, 125, 60)], 20)
        self.dashes = (rng.uniform(2.0, 4.0), rng.uniform(6.0, 12.0))
        self.crosswalk = rng.uniform(8.0, 40.0) if rng.uniform() < 0.3 else None
        self.exposure = rng.uniform(0.55, 1.3)
        self.tint = rng.uniform(0.88, 1.12, 3)
        self.haze_distance = rng.uniform(60.0, 400.0)
        self.sunny = sky_kind == 0 and rng.uniform() < 0.8
        self.shadow_side = int(rng.integers(2))
        self.sun_slope = rng.uniform(0.3, 1.2)
        self.noise_sigma = rng.uniform(1.5, 7.0)
        self.hood = rng.uniform(0.08, 0.16) if rng.uniform() < 0.3 else None

    def _place_objects(self, rng):
        """Objects on the ground as (kind, x, depth, parameters), kind in car/person/pole/tree/bin."""
        objects = []
        left, right = self.curbs
        lane = (right - left) / 2
        for _ in range(rng.integers(0, 9)):
            lane_start = left if rng.uniform() < 0.5 else left + lane  # either direction of traffic
            x = rng.uniform(lane_start + 1.0, lane_start + lane - 1.0)
            objects.append(("car", x, rng.uniform(4.0, 70.0), (_car_colour(rng), rng.uniform(3.8, 4.8))))
        for _ in range(rng.integers(0, 12)):
            side = int(rng.integers(2))
            lo, hi = (self.facades[0] + 0.3, left - 0.3) if side == 0 else (right + 0.3, self.facades[1] - 0.3)
            if rng.uniform() < 0.15:  # crossing the road
                lo, hi = left + 0.5, right - 0.5
            objects.append(("person", rng.uniform(lo, hi), rng.uniform(3.0, 45.0),
                            (rng.uniform(1.5, 1.95), _clothes(rng), _clothes(rng),
                             _pick(rng, [(230, 190, 160), (190, 140, 100), (120, 80, 55)], 15),
                             rng.uniform(-0.25, 0.25))))
        # Poles and trees alternate along both curbs.
        spacing = rng.uniform(10.0, 30.0)
        for side in range(2):
            outward = -1.0 if side == 0 else 1.0  # from the road towards the facade
            z = rng.uniform(3.0, spacing)
            while z < min(self.backdrop_depth, 90.0):
                if rng.uniform() < 0.6:
                    arm = -outward * rng.uniform(0.8, 2.0) if rng.uniform() < 0.5 else 0.0  # lamps reach over the road
                    sign = rng.uniform(2.0, 2.8) if rng.uniform() < 0.4 else None
                    objects.append(("pole", self.curbs[side] + outward * 0.5, z, (
                        rng.uniform(0.1, 0.25), rng.uniform(4.0, 9.0), arm, sign,
                        _pick(rng, [(90, 90, 95), (60, 65, 60), (140, 140, 135)], 15),
                        _pick(rng, [(200, 30, 30), (30, 60, 180), (230, 200, 30), (235, 235, 235)], 20))))
                else:
                    objects.append(("tree", self.curbs[side] + outward * rng.uniform(0.6, 1.4), z, (
                        rng.uniform(1.2, 2.8), rng.uniform(1.0, 2.2), rng.uniform(3.5, 6.5), _leaf_colour(rng))))
                z += spacing * rng.uniform(0.5, 1.5)
        for _ in range(rng.integers(0, 4)):
            lo, hi = ((self.facades[0] + 0.4, left - 0.3) if rng.uniform() < 0.5
                      else (right + 0.3, self.facades[1] - 0.4))
            objects.append(("bin", rng.uniform(lo, hi), rng.uniform(3.0, 40.0),
                            (rng.uniform(0.5, 1.0), rng.uniform(0.8, 1.3), _car_colour(rng))))
        return objects

    # ---- projection ---------------------------------------------------------------------------------

    def _plane_point(self, u, v, depth):
        """World (x, y) of the point at ``depth`` seen through normalised image point (u, v)."""
        x = (u - self.centre) * depth / (self.focal * _NOMINAL_ASPECT)
        y = self.camera_height - (v - self.horizon) * depth / self.focal
        return x, y

    def _project(self, x, y, depth):
        """Normalised image point of the world point (x, y, depth)."""
        return (self.centre + self.focal * _NOMINAL_ASPECT * x / depth,
                self.horizon + self.focal * (self.camera_height - y) / depth)

    # ---- rendering ----------------------------------------------------------------------------------

    def render(self, height: int, width: int, pixel_rng: np.random.Generator):
        u = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, :]
        v = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]
        image = np.zeros((height, width, 3), np.float32)
        label = np.full((height, width), SKY, np.uint8)
        depth = np.full((height, width), np.inf, np.float32)
        light = np.ones((height, width), np.float32)

        self._backdrop(u, v, image, label, depth)
        self._facade_sides(u, v, image, label, depth, light)
        self._ground(u, v, image, label, depth, light)
        for obj in self.objects:
            getattr(self, "_" + obj[0])(obj, u, v, image, label, depth, height, width)
        if self.hood is not None:  # the ego vehicle's bonnet, void as in Cityscapes
            bonnet = v > 1.0 - self.hood * (1.0 - ((u - 0.5) / 0.9) ** 2)
            brightness = np.broadcast_to(40 + 60 * (1 - v), bonnet.shape)[bonnet]
            image[bonnet] = brightness[:, None] * [0.8, 0.85, 1.0]
            label[bonnet] = IGNORE_LABEL
            depth[bonnet] = 0.5
        self._sky(u, v, image, ~np.isfinite(depth))

        # Haze pulls distant surfaces towards the horizon colour; the sky already is that colour.
        haze = (1.0 - np.exp(-depth / self.haze_distance))[..., None]
        image = np.where(np.isfinite(depth)[..., None], image * (1 - haze) + self.sky_horizon * haze, image)
        image *= (light * self.exposure)[..., None] * self.tint
        vignette = 1.0 - 0.35 * ((u - 0.5) ** 2 + (v - 0.5) ** 2)
        image *= vignette[..., None]
        image += self.noise_sigma * pixel_rng.standard_normal(image.shape, dtype=np.float32)
        return np.clip(image, 0, 255).astype(np.uint8), label

    def _sky(self, u, v, image, open_sky):
        """Vertical gradient with clouds on the pixels that no surface covers."""
        v = np.broadcast_to(v, open_sky.shape)[open_sky]
        u = np.broadcast_to(u, open_sky.shape)[open_sky]
        t = np.clip(v / max(self.horizon, 1e-3), 0, 1)[:, None]
        colour = self.sky_top * (1 - t) + self.sky_horizon * t
        clouds = value_noise(u * 6.0, v * 14.0, self.salt + 1, octaves=3)[:, None]
        cover = np.clip((clouds - (1 - self.cloud_cover)) * 3.0, 0, 1)
        image[open_sky] = colour * (1 - cover) + np.array([235, 235, 240]) * (0.75 + 0.25 * clouds) * cover

    def _backdrop(self, u, v, image, label, depth):
        """Skyline across the end of the street: blocks of buildings or tree lines of varying height."""
        d = self.backdrop_depth
        x, y = self._plane_point(u[0], v[:, 0], d)  # x per column, y per row on the backdrop plane
        block = np.floor(x / 9.0)
        is_building = _hash01(block, np.zeros_like(block), self.salt + 2) < 0.7
        tops = np.where(is_building, 8.0 + 30.0 * _hash01(block, np.ones_like(block), self.salt + 2),
                        4.0 + 5.0 * value_noise(x * 0.7, np.zeros_like(x), self.salt + 3))
        hit = y[:, None] <= tops[None, :]
        rows, cols = np.nonzero(hit)
        xh, yh, building = x[cols], y[rows], is_building[cols]
        shade = 0.75 + 0.25 * _hash01(block[cols], np.full_like(cols, 2), self.salt + 2)
        grey = np.array([150, 150, 155], np.float32) * shade[:, None]
        windows = (np.mod(yh, 3.2) > 1.4) & (np.mod(xh, 2.8) > 1.6)
        building_colour = np.where(windows[:, None], grey * 0.6, grey)
        leaves = value_noise(xh * 2.0, yh * 2.0, self.salt + 4, octaves=2)[:, None]
        image[hit] = np.where(building[:, None], building_colour, self.grass * (0.6 + 0.6 * leaves))
        label[hit] = np.where(building, BUILDING, VEGETATION)
        depth[hit] = d

    def _facade_sides(self, u, v, image, label, depth, light):
        """Facades (or vegetation in the gaps) on the vertical planes x = facade, per side."""
        du = u[0] - self.centre
        for side, plane_x in enumerate(self.facades):
            cols = np.nonzero(du < 0 if side == 0 else du > 0)[0]
            # On a vertical plane the depth depends on the column only.
            z = self.focal * _NOMINAL_ASPECT * plane_x / du[cols]
            starts, kinds, heights, colours, floors = self.segments[side]
            seg = np.clip(np.searchsorted(starts, z, side="right") - 1, 0, len(starts) - 1)
            gap = ~kinds[seg]
            # Vegetation gaps get a ragged top edge.
            ragged = value_noise(z * 0.6, np.zeros_like(z), self.salt + 5 + side)
            top = np.where(gap, heights[seg] * (0.7 + 0.6 * ragged), heights[seg])
            y = self.camera_height - (v - self.horizon) * z / self.focal  # (H, len(cols))
            rows, hit_cols = np.nonzero((y >= 0) & (y <= top) & (z < depth[:, cols]))
            if rows.size == 0:
                continue
            zh, yh, sh, gh = z[hit_cols], y[rows, hit_cols], seg[hit_cols], gap[hit_cols]
            floor_h, window_w, wx, wy = (floors[sh, i] for i in range(4))
            in_window = ((np.mod(zh, window_w) / window_w) < wx) & ((np.mod(yh, floor_h) / floor_h) > 1 - wy) & (
                yh > 1.0) & (yh < heights[sh] - 1.0)
            plaster = 0.85 + 0.3 * value_noise(zh * 3.0, yh * 6.0, self.salt + 6)
            glass = np.array([60, 70, 85], np.float32) * (
                0.7 + 0.8 * value_noise(zh * 0.4, yh * 0.3, self.salt + 7))[:, None]
            colour = np.where(in_window[:, None], glass, colours[sh] * plaster[:, None])
            leaves = value_noise(zh * 2.5, yh * 2.5, self.salt + 8, octaves=3)[:, None]
            colour = np.where(gh[:, None], self.grass * (0.45 + 0.9 * leaves), colour)
            hit = (rows, cols[hit_cols])
            image[hit] = colour
            label[hit] = np.where(gh, VEGETATION, BUILDING)
            depth[hit] = zh
            if self.sunny and side == self.shadow_side:
                light[hit] = 0.6

    def _ground(self, u, v, image, label, depth, light):
        below = np.broadcast_to(v > self.horizon, depth.shape)
        with np.errstate(divide="ignore"):
            z = np.where(v > self.horizon, self.focal * self.camera_height / (v - self.horizon), np.inf)
        z = np.broadcast_to(z, depth.shape)
        hit = below & (z < depth)
        zh = z[hit]
        xh = np.broadcast_to((u - self.centre) * z / (self.focal * _NOMINAL_ASPECT), depth.shape)[hit]
        left, right = self.curbs
        on_road = (xh >= left) & (xh <= right)
        on_pavement = ~on_road & (xh >= self.facades[0]) & (xh <= self.facades[1])

        grain = value_noise(xh * 3.0, zh * 3.0, self.salt + 9, octaves=2)
        patches = value_noise(xh * 0.25, zh * 0.15, self.salt + 10)
        road = self.asphalt * (0.8 + 0.25 * grain + 0.2 * (patches > 0.7))[:, None]
        centre = (left + right) / 2
        dash_len, dash_period = self.dashes
        marking = (np.abs(xh - centre) < 0.08) & (np.mod(zh, dash_period) < dash_len)
        marking |= (np.abs(xh - left - 0.35) < 0.07) | (np.abs(xh - right + 0.35) < 0.07)
        if self.crosswalk is not None:
            marking |= (np.abs(zh - self.crosswalk) < 2.0) & (np.mod(xh, 1.0) < 0.5)
        road = np.where(marking[:, None], np.array([215, 215, 205], np.float32) * (0.85 + 0.15 * grain[:, None]),
                        road)

        joints = (np.mod(xh, self.tile) < 0.04) | (np.mod(zh, self.tile) < 0.04)
        curb = np.minimum(np.abs(xh - left), np.abs(xh - right)) < 0.2
        pavement = self.pavement * (0.9 + 0.2 * grain)[:, None]
        pavement = np.where(joints[:, None], pavement * 0.7, pavement)
        pavement = np.where(curb[:, None], pavement * 1.2 + 20, pavement)
        grass = self.grass * (0.5 + 0.8 * value_noise(xh * 4.0, zh * 4.0, self.salt + 11, octaves=2))[:, None]

        image[hit] = np.where(on_road[:, None], road, np.where(on_pavement[:, None], pavement, grass))
        label[hit] = np.where(on_road, ROAD, np.where(on_pavement, PAVEMENT, VEGETATION))
        depth[hit] = zh
        if self.sunny:
            # Buildings on the shadow side cast a shadow whose reach follows their height.
            starts, kinds, heights = self.segments[self.shadow_side][:3]
            seg = np.clip(np.searchsorted(starts, zh, side="right") - 1, 0, len(starts) - 1)
            reach = heights[seg] * kinds[seg] * self.sun_slope
            shadowed = (xh < self.facades[0] + reach) if self.shadow_side == 0 else (xh > self.facades[1] - reach)
            light[hit] = np.where(shadowed, 0.55, 1.0)

    # ---- objects ------------------------------------------------------------------------------------

    def _window(self, points, height, width):
        """Pixel slices (rows, cols) bounding world points [(x, y, depth), ...], or None when off-frame."""
        us, vs = zip(*(self._project(*p) for p in points))
        c0, c1 = max(int(np.floor(min(us) * width)), 0), min(int(np.ceil(max(us) * width)) + 1, width)
        r0, r1 = max(int(np.floor(min(vs) * height)), 0), min(int(np.ceil(max(vs) * height)) + 1, height)
        return (slice(r0, r1), slice(c0, c1)) if c0 < c1 and r0 < r1 else None

    def _patch(self, x0, x1, y0, y1, z, u, v, height, width):
        """Pixel window covering the world rectangle [x0,x1]×[y0,y1] at depth z, with world coordinates."""
        window = self._window([(x0, y1, z), (x1, y0, z)], height, width)
        if window is None:
            return None
        x, y = self._plane_point(u[:, window[1]], v[window[0]], z)
        shape = (window[0].stop - window[0].start, window[1].stop - window[1].start)
        return window, np.broadcast_to(x, shape), np.broadcast_to(y, shape)

    @staticmethod
    def _paint(window, mask, colour, cls, z, image, label, depth):
        """Paints ``mask`` inside ``window`` where the surface at depth ``z`` (scalar or per pixel) is nearest."""
        mask = mask & (depth[window] > z)
        image[window][mask] = np.broadcast_to(colour, mask.shape + (3,))[mask]
        label[window][mask] = cls
        depth[window][mask] = np.broadcast_to(z, mask.shape)[mask]

    def _car(self, obj, u, v, image, label, depth, height, width):
        _, xc, z, (colour, length) = obj
        half = 0.9
        if abs(xc) > half:  # off-centre cars also show the side that faces the camera
            self._car_side(xc - np.sign(xc) * half, z, length, colour, u, v, image, label, depth, height, width)
        patch = self._patch(xc - half, xc + half, 0.0, 1.45, z, u, v, height, width)
        if patch is None:
            return
        window, x, y = patch
        dx = np.abs(x - xc)
        body = (dx <= half) & (y >= 0.25) & (y <= 1.0)
        cabin = (dx <= 0.72 - 0.3 * (y - 1.0)) & (y > 1.0) & (y <= 1.45)
        wheels = (dx >= 0.55) & (dx <= 0.85) & (y < 0.3)
        glass = cabin & (dx <= 0.62 - 0.3 * (y - 1.0)) & (y > 1.05) & (y < 1.4)
        lamp = (dx > 0.65) & (dx < 0.85) & (y > 0.7) & (y < 0.88)
        shade = np.where(glass[..., None], [35, 40, 50], colour * (0.75 + 0.25 * y / 1.45)[..., None])
        shade = np.where(lamp[..., None], [200, 30, 30], shade)
        shade = np.where(wheels[..., None], [20, 20, 20], shade)
        self._paint(window, body | cabin | wheels, shade, CAR, z, image, label, depth)

    def _car_side(self, side_x, z, length, colour, u, v, image, label, depth, height, width):
        """The car's flank: the vertical plane x = side_x between depths z and z + length."""
        far = z + length
        window = self._window([(side_x, y, d) for y in (0.0, 1.45) for d in (z, far)], height, width)
        if window is None:
            return
        du = u[0, window[1]] - self.centre
        with np.errstate(divide="ignore"):
            zs = np.broadcast_to(self.focal * _NOMINAL_ASPECT * side_x / du, (window[0].stop - window[0].start,
                                                                              du.size))
        ys = self.camera_height - (v[window[0]] - self.horizon) * zs / self.focal
        along = (zs - z) / length
        roof = np.where((along > 0.25) & (along < 0.8), 1.45, 1.0)
        body = (along >= 0) & (along <= 1) & (ys >= 0.15) & (ys <= roof)
        wheel = (np.minimum(np.abs(zs - z - 0.8), np.abs(zs - far + 0.8)) ** 2 + (ys - 0.35) ** 2) < 0.12
        glass = (ys > 1.02) & (ys < 1.4) & (along > 0.28) & (along < 0.77)
        shade = np.where(glass[..., None], [40, 45, 55],
                         np.where(wheel[..., None], [25, 25, 25], colour * (0.7 + 0.2 * np.clip(ys, 0, 1.5))[..., None]))
        self._paint(window, (body | wheel) & (zs > 0), shade, CAR, zs, image, label, depth)

    def _person(self, obj, u, v, image, label, depth, height, width):
        _, xc, z, (tall, shirt, trousers, skin, stride) = obj
        s = tall / 1.75
        patch = self._patch(xc - 0.35 * s, xc + 0.35 * s, 0.0, tall, z, u, v, height, width)
        if patch is None:
            return
        window, x, y = patch
        hip = 0.5 * tall
        legs = (y < hip) & ((np.abs(x - xc - 0.08 * s - stride * (hip - y)) < 0.07 * s)
                            | (np.abs(x - xc + 0.08 * s + stride * (hip - y)) < 0.07 * s))
        torso = (y >= hip - 0.03) & (y < 0.82 * tall) & (np.abs(x - xc) < 0.19 * s)
        arms = (y > 0.48 * tall) & (y < 0.8 * tall) & (np.abs(np.abs(x - xc) - 0.24 * s) < 0.05 * s)
        head = ((x - xc) / (0.1 * s)) ** 2 + ((y - 0.905 * tall) / (0.12 * s)) ** 2 < 1.0
        colour = np.where(legs[..., None], trousers, np.where(head[..., None], skin, shirt))
        self._paint(window, legs | torso | arms | head, colour, PERSON, z, image, label, depth)

    def _pole(self, obj, u, v, image, label, depth, height, width):
        _, xc, z, (thick, tall, arm, sign, metal, sign_colour) = obj
        reach = min(arm, 0.0), max(arm, 0.0)
        patch = self._patch(xc + reach[0] - thick, xc + reach[1] + thick, 0.0, tall + 0.2, z, u, v, height, width)
        if patch is None:
            return
        window, x, y = patch
        shaft = (np.abs(x - xc) <= thick / 2) & (y <= tall)
        lamp_arm = (arm != 0) & (y > tall - 0.12) & (y <= tall + 0.05) & (x >= xc + reach[0]) & (x <= xc + reach[1])
        colour = np.asarray(metal, np.float32) * (0.8 + 0.2 * (x - xc > 0))[..., None]
        self._paint(window, shaft | lamp_arm, colour, POLE, z, image, label, depth)
        if sign is not None:
            # Signs hang in front of the pole, so they are painted slightly nearer.
            board = (np.abs(x - xc) < 0.35) & (np.abs(y - sign) < 0.35)
            self._paint(window, board, sign_colour, IGNORE_LABEL, z - 0.05, image, label, depth)

    def _tree(self, obj, u, v, image, label, depth, height, width):
        _, xc, z, (radius_x, radius_y, crown_height, leaf) = obj
        patch = self._patch(xc - radius_x * 1.3, xc + radius_x * 1.3, 0.0, crown_height + radius_y * 1.3,
                            z, u, v, height, width)
        if patch is None:
            return
        window, x, y = patch
        trunk = (np.abs(x - xc) < 0.15 + 0.03 * (crown_height - y)) & (y < crown_height)
        ragged = value_noise(x * 1.7, y * 1.7, self.salt + 12, octaves=2)
        crown = ((x - xc) / radius_x) ** 2 + ((y - crown_height) / radius_y) ** 2 < 0.75 + 0.5 * ragged
        leaves = value_noise(x * 5.0, y * 5.0, self.salt + 13, octaves=2)[..., None]
        colour = np.where(crown[..., None], np.asarray(leaf) * (0.5 + 0.8 * leaves), [80, 60, 40])
        self._paint(window, crown | trunk, colour, VEGETATION, z, image, label, depth)

    def _bin(self, obj, u, v, image, label, depth, height, width):
        _, xc, z, (wide, tall, colour) = obj
        patch = self._patch(xc - wide / 2, xc + wide / 2, 0.0, tall, z, u, v, height, width)
        if patch is None:
            return
        window, x, y = patch
        box = (np.abs(x - xc) <= wide / 2) & (y <= tall)
        self._paint(window, box, colour * (0.8 + 0.2 * y / tall)[..., None], IGNORE_LABEL, z, image, label, depth)


def _pick(rng, colours, jitter) -> np.ndarray:
    return np.asarray(colours[rng.integers(len(colours))], np.float32) + rng.uniform(-jitter, jitter, 3)


def _facade_colour(rng) -> np.ndarray:
    return _pick(rng, [(190, 180, 160), (150, 150, 150), (160, 90, 70), (220, 215, 200), (100, 100, 105),
                       (200, 170, 120), (120, 130, 140)], 25)


def _car_colour(rng) -> np.ndarray:
    return _pick(rng, [(30, 30, 35), (200, 200, 205), (130, 130, 135), (150, 20, 20), (20, 40, 120),
                       (230, 230, 230), (60, 90, 60), (170, 140, 60)], 20)


def _clothes(rng) -> np.ndarray:
    return np.asarray(rng.uniform(20, 230, 3) if rng.uniform() < 0.5 else rng.uniform(20, 80) * np.ones(3),
                      np.float32)


def _leaf_colour(rng) -> np.ndarray:
    return _pick(rng, [(60, 100, 35), (80, 115, 45), (45, 80, 40), (170, 140, 40)], 15)


def render_scene(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Renders scene ``seed`` at the given resolution.

    Returns:
      image: uint8 (height, width, 3) RGB.
      label: uint8 (height, width) class ids of ``SYNTHETIC_INFO`` or 255 for void.
    """
    if height < 1 or width < 1:
        raise ValueError(f"render_scene needs a positive size, got height={height}, width={width}")
    scene = _Scene(seed)
    # Sensor noise is per pixel, so it has its own stream and cannot disturb the layout.
    return scene.render(height, width, np.random.default_rng([seed, height, width]))


def scene_seed(seed: int, split: str, index: int) -> int:
    """Seed of scene ``index`` of ``split``; distinct splits never share a scene."""
    split_code = {"train": 0, "val": 1}[split]
    return int(np.random.SeedSequence([seed, split_code, index]).generate_state(1, np.uint32)[0])
