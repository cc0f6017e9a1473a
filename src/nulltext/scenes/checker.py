"""The programmatic checker: read colour, position, shape and size of every object back from images."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nulltext.data import check_resolution
from nulltext.errors import NulltextError
from nulltext.scenes.layouts import (
    CENTRE_TABLE,
    COLOUR_TABLE,
    COLOURS,
    MAX_OBJECTS,
    POSITIONS,
    SHAPES,
    SIZE_RADII,
    SIZES,
    TONE_TABLE,
    Scene,
    SceneLayout,
    as_scene,
    layout_from_scenes,
)
from nulltext.scenes.render import coverage

_TEMPLATE_PHASES = 8  # the checker places templates to 1/8 pixel
# The checker fits each shape at 9 radii, a geometric grid with 4 steps from small to large
# (about 12% apart), from 0.8 x small to 1.25 x large, so blurred, eroded or in-between sizes
# still match their shape; the best radius gives the size (small below sqrt(small * large)).
# (Going lower than 0.8 x small lets a small circle fit a small diamond better than the
# diamond does: measured, clean renders 99.8% -> 100% and blurred 96.3% -> 97.6% shape.)
_SCALE_STEP = (SIZE_RADII["large"] / SIZE_RADII["small"]) ** 0.25
_TEMPLATE_SCALES: tuple[float, ...] = tuple(
    SIZE_RADII["small"] * _SCALE_STEP**i for i in range(-2, 7)
)
_SIZE_SPLIT = math.sqrt(SIZE_RADII["small"] * SIZE_RADII["large"])
_SCALE_SIZE = torch.tensor([0 if r < _SIZE_SPLIT - 1e-9 else 1 for r in _TEMPLATE_SCALES])
_SHAPE_CENTROID_DY = torch.tensor(  # centroid minus box centre, unit y (triangle: below)
    [0.0, 0.0, 1.0 / (2 * math.sqrt(3.0)), 0.0, 0.0, 0.0], dtype=torch.float64
)
_SHAPE_AREAS = torch.tensor(  # unit areas (r = 1)
    [
        math.pi * 0.95**2,
        1.7**2,
        math.sqrt(3.0),
        2 * 0.8 * 1.0,
        2 * (2.0 * 0.6) - 0.6**2,
        math.pi * (0.97**2 - 0.53**2),
    ],
    dtype=torch.float64,
)

_XYZ_FROM_RGB = torch.tensor(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ],
    dtype=torch.float64,
)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)


def rgb_to_lab(rgb: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """sRGB values in [0, 255] (any float/uint8 tensor, channels along ``dim``) to CIELAB (D65),
    in the input's floating dtype (float32 for integers)."""
    c = rgb if rgb.is_floating_point() else rgb.float()
    c = (c / 255.0).clamp(0.0, 1.0).movedim(dim, -1)
    lin = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = _XYZ_FROM_RGB.to(device=c.device, dtype=c.dtype)
    xyz = lin @ m.T / _WHITE_D65.to(device=c.device, dtype=c.dtype)
    eps, kappa = 216 / 24389, 24389 / 27
    f = torch.where(xyz > eps, xyz.clamp(min=1e-12) ** (1 / 3), (kappa * xyz + 16) / 116)
    lab = torch.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1
    )
    return lab.movedim(-1, dim)


def _colour_margins() -> torch.Tensor:
    """Per object colour: the CIELAB distance to the nearest other object colour or to the
    nearest background pixel colour (any mix of a background colour's two tones)."""
    obj = rgb_to_lab(COLOUR_TABLE.double())  # [8, 3]
    t = torch.linspace(0, 1, 33, dtype=torch.float64)[:, None, None]
    tones = TONE_TABLE.double()
    mixes = tones[None, :, 0] * (1 - t) + tones[None, :, 1] * t  # [33, 5, 3]
    bg = rgb_to_lab(mixes.reshape(-1, 3))
    d_obj = torch.cdist(obj, obj) + torch.eye(len(COLOURS), dtype=torch.float64) * 1e9
    d_bg = torch.cdist(obj, bg)
    return torch.minimum(d_obj.min(1).values, d_bg.min(1).values)


@dataclass
class CheckResult:
    """What :class:`SceneChecker` read back from a batch of ``B`` images.

    Per object, ``[B, 3]`` (slot ``j`` is the scene's ``j``-th object; slots past the scene's
    object count have ``object_valid`` False and every ``*_ok`` False): ``object_colour_ok`` (a
    region of the object's colour, large enough, was found), ``object_position_ok`` (its
    centroid is nearest to the expected position centre), ``object_shape_ok`` (the rendered
    shape template that best matches the region, by IoU, has the expected shape),
    ``object_size_ok`` (... and the expected size); position/shape/size are False when no
    region was found. Diagnostics: ``found_position``, ``found_shape``, ``found_size`` (indices
    into :data:`POSITIONS`, :data:`SHAPES`, :data:`SIZES`; -1 if no region), ``area`` (pixels
    at the checker's resolution), ``centroid`` (``[B, 3, 2]`` ``(x, y)`` fractions, NaN if no
    region), ``iou`` (IoU of the best template).

    Per image, ``[B]`` bool: ``colour_ok``, ``position_ok``, ``shape_ok``, ``size_ok`` (every
    object of the scene passes that check) and ``all_ok`` (every check of every object).
    """

    object_valid: torch.Tensor
    object_colour_ok: torch.Tensor
    object_position_ok: torch.Tensor
    object_shape_ok: torch.Tensor
    object_size_ok: torch.Tensor
    found_position: torch.Tensor
    found_shape: torch.Tensor
    found_size: torch.Tensor
    area: torch.Tensor
    centroid: torch.Tensor
    iou: torch.Tensor

    def _image(self, ok: torch.Tensor) -> torch.Tensor:
        return (ok | ~self.object_valid).all(dim=1)

    @property
    def colour_ok(self) -> torch.Tensor:
        return self._image(self.object_colour_ok)

    @property
    def position_ok(self) -> torch.Tensor:
        return self._image(self.object_position_ok)

    @property
    def shape_ok(self) -> torch.Tensor:
        return self._image(self.object_shape_ok)

    @property
    def size_ok(self) -> torch.Tensor:
        return self._image(self.object_size_ok)

    @property
    def all_ok(self) -> torch.Tensor:
        ok = self.object_colour_ok & self.object_position_ok & self.object_shape_ok
        return self._image(ok & self.object_size_ok)

    def __len__(self) -> int:
        return int(self.object_valid.shape[0])

    def accuracy(self) -> dict[str, float]:
        """Per-object accuracies (over all objects) and per-image pass rates (NaN if none)."""
        valid = self.object_valid
        n_obj, n_img = int(valid.sum()), len(self)

        def rate(count: torch.Tensor, n: int) -> float:
            return float(count) / n if n else float("nan")

        out = {}
        for name in ("colour", "position", "shape", "size"):
            ok = getattr(self, f"object_{name}_ok")
            out[f"object_{name}"] = rate((ok & valid).sum(), n_obj)
            out[f"image_{name}"] = rate(getattr(self, f"{name}_ok").sum(), n_img)
        out["image_all"] = rate(self.all_ok.sum(), n_img)
        return out

    def records(self) -> list[dict[str, Any]]:
        """JSON-friendly per-image records: the four per-image flags and, per object, its flags
        and what was read back (``position``, ``shape``, ``size``: names or None)."""
        out = []
        names = ("colour", "position", "shape", "size", "all")
        per_image = {k: getattr(self, f"{k}_ok").tolist() for k in names}
        for b in range(len(self)):
            objects = []
            for j in range(MAX_OBJECTS):
                if not bool(self.object_valid[b, j]):
                    continue
                pos = int(self.found_position[b, j])
                shp = int(self.found_shape[b, j])
                siz = int(self.found_size[b, j])
                objects.append(
                    {
                        "colour_ok": bool(self.object_colour_ok[b, j]),
                        "position_ok": bool(self.object_position_ok[b, j]),
                        "shape_ok": bool(self.object_shape_ok[b, j]),
                        "size_ok": bool(self.object_size_ok[b, j]),
                        "position": POSITIONS[pos] if pos >= 0 else None,
                        "shape": SHAPES[shp] if shp >= 0 else None,
                        "size": SIZES[siz] if siz >= 0 else None,
                        "area": float(self.area[b, j]),
                        "iou": float(self.iou[b, j]),
                    }
                )
            out.append({**{f"{k}_ok": v[b] for k, v in per_image.items()}, "objects": objects})
        return out


def _max3x3(t: torch.Tensor) -> torch.Tensor:
    """3x3 max filter of a non-negative ``[N, H, W]`` tensor, zero outside (separable; much
    faster than ``max_pool2d`` with one channel on CPU)."""
    h = t.clone()
    h[..., 1:] = torch.maximum(h[..., 1:], t[..., :-1])
    h[..., :-1] = torch.maximum(h[..., :-1], t[..., 1:])
    v = h.clone()
    v[..., 1:, :] = torch.maximum(v[..., 1:, :], h[..., :-1, :])
    v[..., :-1, :] = torch.maximum(v[..., :-1, :], h[..., 1:, :])
    return v


def _connected_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of ``mask`` (bool ``[N, H, W]``): float ``[N, H, W]`` labels,
    0 outside the mask, else the largest ``1 + flat pixel index`` of the pixel's component.

    Label propagation (3x3 max inside the mask) with pointer jumping: a pixel labelled ``L``
    also takes the label of pixel ``L - 1`` (same component, label >= L), so labels travel
    far in one step."""
    n, h, w = mask.shape
    m = mask.float()
    labels = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, h, w) * m
    if n == 0:
        return labels
    while True:
        before = labels
        for _ in range(2):
            labels = _max3x3(labels) * m
            flat = labels.view(n, h * w)
            pointer = (flat.long() - 1).clamp(min=0)
            labels = torch.maximum(flat, flat.gather(1, pointer) * flat.gt(0)).view(n, h, w)
        if torch.equal(labels, before):
            return labels


class SceneChecker:
    """Reads back, from images of scenes, whether each object of the expected :class:`Scene`
    has the right colour, position and shape (and size).

    Method, per image, at ``resolution`` (larger images are area-downsampled to it; smaller ones
    are checked at their own size):

    1. **colour**: convert to CIELAB; a pixel belongs to object colour ``c`` if it lies within
       ``colour_tolerance * margin(c)`` of ``c``, where ``margin(c)`` is the distance from ``c``
       to the nearest other object colour or background pixel colour (33 to 51 units; the
       background palette is disjoint from, and far from, the object palette). The object's
       region is the largest 8-connected component of those pixels; ``colour_ok`` if its area
       is at least ``min_area`` times the expected shape's area at the expected size.
    2. **position**: the region's centroid -> the nearest :data:`POSITION_CENTRES` entry.
    3. **shape** (and size): IoU of the region with each of the 6 x 2 shape/size templates,
       rendered with the renderer's own signed distance functions, centred on the region's
       centroid (each template's own centroid placed there); the best template gives the shape
       and the size.

    **Objects sharing a colour** (allowed in sampled scenes) share one colour mask: its
    largest components (as many as there are such objects, each passing the area test) are
    assigned to those objects by the assignment (brute force over at most 3! orders) that
    finds a region for as many objects as possible and then minimises the total distance from
    region centroids to the objects' expected position centres. So two red objects drawn at the
    two right places both pass position, whichever caption order; drawn one at a right place
    and one at a wrong place, one passes and one fails; a missing one fails colour.

    Per-image flags ask every object of the scene to pass; see :class:`CheckResult`.
    """

    def __init__(
        self,
        resolution: int = 64,
        colour_tolerance: float = 0.45,
        min_area: float = 0.3,
        device: str | torch.device | None = None,
    ) -> None:
        self.resolution = check_resolution(resolution)
        if not 0 < colour_tolerance <= 1:
            raise NulltextError(f"colour_tolerance must be in (0, 1], got {colour_tolerance!r}")
        if not 0 <= min_area:
            raise NulltextError(f"min_area must be >= 0, got {min_area!r}")
        self.colour_tolerance = float(colour_tolerance)
        self.min_area = float(min_area)
        self.device = None if device is None else torch.device(device)
        self.margins = _colour_margins()
        self._palette_lab = rgb_to_lab(COLOUR_TABLE.double()).float()
        self._thresholds = (self.margins * self.colour_tolerance).float()

    def __call__(self, images: torch.Tensor, scenes: Any) -> CheckResult:
        return self.check(images, scenes)

    def check(
        self,
        images: torch.Tensor,
        scenes: Scene | Mapping[str, Any] | Sequence[Scene | Mapping[str, Any]],
    ) -> CheckResult:
        """Check ``images`` (uint8 ``[3, R, R]`` or ``[B, 3, R, R]``, or float in [0, 1])
        against ``scenes`` (one :class:`Scene` / ``as_dict()`` mapping per image)."""
        if isinstance(scenes, (Scene, Mapping)):
            scenes = [scenes]
        scenes = [as_scene(s) for s in scenes]
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise NulltextError(
                f"images must be [3, R, R] or [B, 3, R, R], got {tuple(images.shape)}"
            )
        if images.shape[0] != len(scenes):
            raise NulltextError(f"{images.shape[0]} images but {len(scenes)} scenes")
        device = self.device or images.device
        x = images.to(device)
        x = x.float() if not x.is_floating_point() else x.float() * 255.0
        res = min(self.resolution, int(x.shape[-1]))
        if x.shape[-1] != res or x.shape[-2] != res:
            x = F.interpolate(x, size=(res, res), mode="area")
        layout = layout_from_scenes(scenes, jitter=False)
        return self._check(x, layout, res, device)

    # -- internals ------------------------------------------------------------------------------

    def _check(
        self, x: torch.Tensor, layout: SceneLayout, res: int, device: torch.device
    ) -> CheckResult:
        b = x.shape[0]
        k = MAX_OBJECTS
        valid = layout.valid.to(device)
        colour = layout.colour.to(device)
        lab = rgb_to_lab(x, dim=1)  # [B, 3, R, R]
        palette = self._palette_lab.to(device)[colour]  # [B, 3(slots), 3(Lab)]
        dist = (lab[:, None] - palette[..., None, None]).norm(dim=2)  # [B, slots, R, R]
        threshold = self._thresholds.to(device)[colour]
        mask = (dist < threshold[..., None, None]) & valid[..., None, None]

        # Components and their statistics, for the used object slots only.
        rows = valid.reshape(-1).nonzero().squeeze(1)
        labels = torch.zeros(b * k, res, res, device=device)
        labels[rows] = _connected_components(mask.reshape(b * k, res, res)[rows])
        flat = labels[rows].reshape(rows.numel(), res * res).long()
        bins = res * res + 1
        coords = (torch.arange(res, device=device, dtype=torch.float32) + 0.5) / res
        xs = coords[None, :].expand(res, res).reshape(1, -1).expand_as(flat)
        ys = coords[:, None].expand(res, res).reshape(1, -1).expand_as(flat)
        stats = torch.zeros(3, rows.numel(), bins, device=device)
        stats[0].scatter_add_(1, flat, torch.ones_like(xs))
        stats[1].scatter_add_(1, flat, xs)
        stats[2].scatter_add_(1, flat, ys)
        stats[0, :, 0] = 0  # label 0: outside the mask
        rows_area, rows_label = stats[0].topk(min(k, bins), dim=1)  # largest components
        top_area = torch.zeros(b * k, k, device=device)
        top_label = torch.zeros(b * k, k, dtype=torch.long, device=device)
        top_c = torch.zeros(b * k, k, 2, device=device)
        top_area[rows] = rows_area
        top_label[rows] = rows_label
        top_c[rows, :, 0] = stats[1].gather(1, rows_label) / rows_area.clamp(min=1)
        top_c[rows, :, 1] = stats[2].gather(1, rows_label) / rows_area.clamp(min=1)
        top_area = top_area.view(b, k, k)
        top_label = top_label.view(b, k, k)
        top_c = top_c.view(b, k, k, 2)

        shape = layout.shape.to(device)
        small = float(SIZE_RADII["small"]) * res  # the colour test does not judge size
        need = self.min_area * _SHAPE_AREAS.to(device)[shape].float() * small**2
        expected = CENTRE_TABLE.to(device)[layout.position.to(device)].float()  # [B, slots, 2]

        # Region choice: candidate 0 (the largest component) for objects of a unique colour;
        # an assignment for objects sharing a colour.
        choice = torch.zeros(b, k, dtype=torch.long, device=device)
        found = valid & (top_area[:, :, 0] >= need)
        colours_l = layout.colour.tolist()
        counts_l = layout.count.tolist()
        dup_rows = [i for i in range(b) if len(set(colours_l[i][: counts_l[i]])) < counts_l[i]]
        if dup_rows:
            area_l, cent_l, need_l, exp_l = (
                t[dup_rows].tolist() for t in (top_area, top_c, need, expected)
            )
            for r, i in enumerate(dup_rows):
                groups: dict[int, list[int]] = {}
                for j in range(counts_l[i]):
                    groups.setdefault(colours_l[i][j], []).append(j)
                for slots in groups.values():
                    if len(slots) < 2:
                        continue
                    cand = area_l[r][slots[0]]  # the shared mask's components, largest first
                    cents = cent_l[r][slots[0]]
                    best = None
                    for order in itertools.permutations(range(k), len(slots)):
                        pairs = [
                            (j, c) for j, c in zip(slots, order) if cand[c] >= max(need_l[r][j], 1)
                        ]
                        cost = sum(math.dist(cents[c], exp_l[r][j]) for j, c in pairs)
                        key = (-len(pairs), cost)
                        if best is None or key < best[0]:
                            best = (key, pairs)
                    assigned = dict(best[1]) if best else {}
                    for j in slots:
                        found[i, j] = j in assigned
                        choice[i, j] = assigned.get(j, 0)

        region_area = top_area.gather(2, choice[..., None])[..., 0]
        region_label = top_label.gather(2, choice[..., None])[..., 0]
        region_c = top_c.gather(2, choice[..., None, None].expand(b, k, 1, 2))[:, :, 0]

        # Position: nearest position centre.
        d_pos = (region_c[:, :, None, :] - CENTRE_TABLE.to(device).float()[None, None]).norm(dim=-1)
        found_position = torch.where(found, d_pos.argmin(-1), -1)

        # Shape and size: IoU against the 12 templates, in a window around the centroid.
        found_shape = torch.full((b, k), -1, dtype=torch.long, device=device)
        found_size = torch.full((b, k), -1, dtype=torch.long, device=device)
        best_iou = torch.zeros(b, k, device=device)
        idx = found.nonzero()  # [N, 2]
        if idx.numel():
            iou = self._template_iou(
                labels.view(b, k, res, res), idx, region_label, region_area, region_c, res
            )  # [N, shapes, scales]
            best, arg = iou.flatten(1).max(dim=1)
            scale = arg % len(_TEMPLATE_SCALES)
            found_shape[idx[:, 0], idx[:, 1]] = arg // len(_TEMPLATE_SCALES)
            found_size[idx[:, 0], idx[:, 1]] = _SCALE_SIZE.to(device)[scale]
            best_iou[idx[:, 0], idx[:, 1]] = best

        centroid = torch.where(found[..., None], region_c, torch.nan)
        return CheckResult(
            object_valid=valid.cpu(),
            object_colour_ok=found.cpu(),
            object_position_ok=(found & (found_position == layout.position.to(device))).cpu(),
            object_shape_ok=(found & (found_shape == shape)).cpu(),
            object_size_ok=(found & (found_size == layout.size.to(device))).cpu(),
            found_position=found_position.cpu(),
            found_shape=found_shape.cpu(),
            found_size=found_size.cpu(),
            area=torch.where(found, region_area, 0.0).cpu(),
            centroid=centroid.cpu(),
            iou=best_iou.cpu(),
        )

    def _template_bank(self, res: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """Coverage templates ``[shapes, scales, P+1, P+1, S, S]`` of every shape at every
        :data:`_TEMPLATE_SCALES` radius, the template's centroid placed at sub-pixel offsets
        ``(q / P - 0.5)`` pixels (``P = 8``) from the centre pixel of an ``S x S`` window;
        cached per resolution and device."""
        key = (res, str(device))
        cache = self.__dict__.setdefault("_banks", {})
        if key in cache:
            return cache[key]
        phases = _TEMPLATE_PHASES
        half = math.ceil((1 + 0.3) * max(_TEMPLATE_SCALES) * res) + 2
        side = 2 * half + 1
        grid = (torch.arange(side, device=device, dtype=torch.float32) - half) / res
        shift = (torch.arange(phases + 1, device=device, dtype=torch.float32) / phases - 0.5) / res
        qy, qx = torch.meshgrid(shift, shift, indexing="ij")
        qx, qy = qx.reshape(-1), qy.reshape(-1)  # [(P+1)^2]
        m = qx.numel()
        x = grid[None, None, :].expand(m, side, side)
        y = grid[None, :, None].expand(m, side, side)
        bank = torch.empty(
            len(SHAPES), len(_TEMPLATE_SCALES), phases + 1, phases + 1, side, side, device=device
        )
        for s in range(len(SHAPES)):
            for z, r in enumerate(_TEMPLATE_SCALES):
                cov = coverage(
                    torch.full((m,), s, dtype=torch.long, device=device),
                    qx,
                    qy - float(_SHAPE_CENTROID_DY[s]) * r,
                    torch.full((m,), r, device=device),
                    x,
                    y,
                    res,
                )
                bank[s, z] = cov.view(phases + 1, phases + 1, side, side)
        bank = bank.flatten(0, 1)  # [shapes * scales, P+1, P+1, S, S]
        cache[key] = (bank, bank.sum(dim=(-2, -1)), half)
        return cache[key]

    def _template_iou(
        self,
        labels: torch.Tensor,
        idx: torch.Tensor,
        region_label: torch.Tensor,
        region_area: torch.Tensor,
        region_c: torch.Tensor,
        res: int,
    ) -> torch.Tensor:
        """IoU ``[N, shapes, scales]`` of each found region (``idx``: ``[N, 2]`` image, slot)
        with the templates centred on its centroid (to 1/8 pixel)."""
        device = labels.device
        bank, bank_sums, half = self._template_bank(res, device)
        bi, sj = idx[:, 0], idx[:, 1]
        cent = region_c[bi, sj] * res - 0.5  # [N, 2] pixel coordinates of the centroid
        label = region_label[bi, sj].float()
        area = region_area[bi, sj]
        centre = cent.round()
        q = ((cent - centre + 0.5) * _TEMPLATE_PHASES).round().long().clamp(0, _TEMPLATE_PHASES)
        off = torch.arange(-half, half + 1, device=device)
        col = centre[:, 0].long()[:, None] + off  # [N, S]
        row = centre[:, 1].long()[:, None] + off
        inside_c = (col >= 0) & (col < res)
        inside_r = (row >= 0) & (row < res)
        window = labels[
            bi[:, None, None],
            sj[:, None, None],
            row.clamp(0, res - 1)[:, :, None],
            col.clamp(0, res - 1)[:, None, :],
        ]
        inside = inside_r[:, :, None] & inside_c[:, None, :]
        region = ((window == label[:, None, None]) & inside).float()  # [N, S, S]
        n = idx.shape[0]
        inter = torch.empty(bank.shape[0], n, device=device)
        for i in range(0, n, 64):  # bounded memory: [templates, 64, S, S] at a time
            sl = slice(i, i + 64)
            templates = bank[:, q[sl, 1], q[sl, 0]]
            inter[:, sl] = (templates * region[None, sl]).sum(dim=(2, 3))
        union = area[None] + bank_sums[:, q[:, 1], q[:, 0]] - inter
        iou = (inter / union.clamp(min=1e-6)).T
        return iou.view(n, len(SHAPES), len(_TEMPLATE_SCALES))
