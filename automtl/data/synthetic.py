"""Synthetic scenes: a dense three-task data set (segmentation, depth, normals) that needs no
download, so the whole pipeline can be run and measured anywhere.

Each scene is a tilted, textured ground plane with a few shapes in front of it: discs are
spheres (curved depth and normals), rectangles, triangles and diamonds are tilted flat
plates. Visibility is a z-buffer over all surfaces, so nearer shapes occlude farther ones,
and the image is rendered from the same geometry (class colour, Lambertian shading from the
normals, haze growing with depth, apparent size shrinking with depth), so every target is
learnable from the pixels. A sample is a pure function of (seed, split, index): it is
generated on the fly from its own ``torch.Generator`` and never touches the global RNG.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..seeding import stable_seed as sample_seed
from ..tasks import Task

#: Shape kinds in class order (class 0 is the background).
SHAPES = ("disc", "rectangle", "triangle", "diamond")
#: Base RGB albedo of each class (background first).
_COLOURS = torch.tensor(
    [
        [0.55, 0.50, 0.45],  # background
        [0.90, 0.25, 0.20],  # disc
        [0.20, 0.45, 0.90],  # rectangle
        [0.25, 0.80, 0.30],  # triangle
        [0.90, 0.80, 0.20],  # diamond
    ]
)
_INF = float("inf")




class SyntheticScenes(Dataset):
    """``n`` synthetic scenes of ``size`` x ``size`` pixels with targets
    ``segmentation`` (H, W) int64, ``depth`` (1, H, W) float32 and ``normal`` (3, H, W) unit
    vectors (camera frame: x right, y down, z towards the camera).

    ``classes`` is the number of segmentation classes including the background (2 to 5; the
    default 4 is background, disc, rectangle, triangle). ``missing`` is the probability that a
    task's target of a sample is blanked (segmentation 255, depth and normal NaN), to exercise
    partially labelled training.
    """

    def __init__(
        self,
        n: int,
        size: int = 64,
        seed: int = 0,
        classes: int = 4,
        split: str = "train",
        max_shapes: int = 5,
        missing: float = 0.0,
    ):
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"synthetic scenes need a positive number of samples, got n={n!r}")
        if not isinstance(size, int) or size < 8:
            raise ConfigError(f"synthetic scene size must be an integer of at least 8 pixels, got size={size!r}")
        if not isinstance(classes, int) or not 2 <= classes <= len(SHAPES) + 1:
            raise ConfigError(
                f"synthetic scenes have 2 to {len(SHAPES) + 1} classes (background plus shapes), not {str(classes)[:20]}; "
                f"give their segmentation task 2 to {len(SHAPES) + 1} (--task segmentation:segmentation:4 on the command "
                "line, classes=4 in Python), or use your own data"
            )
        if not isinstance(max_shapes, int) or max_shapes < 1:
            raise ConfigError(f"max_shapes must be a positive integer, got {max_shapes!r}")
        if not 0.0 <= float(missing) < 1.0:
            raise ConfigError(f"missing must be a probability in [0, 1), got {missing!r}")
        self.n = n
        self.size = size
        self.seed = seed
        self.classes = classes
        self.split = str(split)
        self.max_shapes = max_shapes
        self.missing = float(missing)
        # pixel centres in [-1, 1]; v grows downwards
        c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
        self._v, self._u = torch.meshgrid(c, c, indexing="ij")
        self._colours = _COLOURS[:classes]

    @property
    def class_names(self) -> list[str]:
        return ["background", *SHAPES[: self.classes - 1]]

    @property
    def tasks(self) -> list[Task]:
        """The natural task specs of this data set."""
        return [
            Task("segmentation", kind="segmentation", classes=self.classes),
            Task("depth", kind="depth"),
            Task("normal", kind="normal"),
        ]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} synthetic scenes")
        index = index % self.n
        g = torch.Generator().manual_seed(sample_seed("synthetic", self.seed, self.split, index))
        # One sample is a few thousand pixels: intra-op threads only add synchronisation, which
        # costs milliseconds per op when the cores are busy training. Render single-threaded.
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            return self._render(g)
        finally:
            if threads > 1:
                torch.set_num_threads(threads)

    # ------------------------------------------------------------------ rendering
    def _render(self, g: torch.Generator):
        rnd = torch.rand(16 + 8 * self.max_shapes, generator=g).tolist()  # scalar draws, consumed in order
        it = iter(rnd)

        def uni(a, b):
            return a + (b - a) * next(it)

        depth, normal, seg = _z_buffer(*self._surfaces(g, uni, it))
        image = self._appearance(g, uni, depth, normal, seg)
        depth = depth[None].float()
        normal = normal.float()
        if self.missing > 0:
            drop = torch.rand(3, generator=g) < self.missing
            if bool(drop[0]):
                seg = torch.full_like(seg, 255)
            if bool(drop[1]):
                depth = torch.full_like(depth, float("nan"))
            if bool(drop[2]):
                normal = torch.full_like(normal, float("nan"))
        return image.float().contiguous(), {"segmentation": seg.long(), "depth": depth, "normal": normal}

    def _surfaces(self, g: torch.Generator, uni, it) -> tuple[list, list, list]:
        """The ground plane and the shapes: each surface's depth (inf outside it), depth gradient and class."""
        u, v = self._u, self._v
        # Ground plane: depth grows towards the top of the image.
        a, bv, bu = uni(5.0, 7.0), uni(-2.5, -1.0), uni(-0.5, 0.5)
        surfaces_d = [a + bu * u + bv * v]
        surfaces_n = [(torch.full_like(u, bu), torch.full_like(u, bv))]  # (d_u, d_v) of each surface
        surfaces_c = [0]

        k = 1 + int(next(it) * self.max_shapes)
        kinds = torch.randint(1, self.classes, (k,), generator=g).tolist()
        for cls in kinds:
            dc = uni(2.0, 4.5)
            cu, cv = uni(-0.8, 0.8), uni(-0.8, 0.8)
            scale = uni(0.25, 0.45) * 3.0 / dc  # nearer looks bigger
            inside, d, gu, gv = _shape(SHAPES[cls - 1], u - cu, v - cv, dc, scale, uni)
            surfaces_d.append(torch.where(inside, d, torch.full_like(d, _INF)))
            surfaces_n.append((gu, gv))
            surfaces_c.append(cls)
        return surfaces_d, surfaces_n, surfaces_c

    def _appearance(self, g: torch.Generator, uni, depth, normal, seg) -> torch.Tensor:
        """Albedo (class colour, textured ground), Lambertian shading, haze, noise."""
        u = self._u
        H = W = self.size
        albedo = self._colours[seg].permute(2, 0, 1)  # (3, H, W)
        coarse = torch.rand(1, 1, 6, 6, generator=g)
        texture = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)[0]
        stripes = 0.5 + 0.5 * torch.sin(u * uni(6.0, 14.0) / (depth - 1.0) + uni(0, 6.28))  # recede with depth
        ground = (seg == 0).float()
        albedo = albedo * (1.0 + ground * (0.35 * (texture - 0.5) + 0.15 * (stripes - 0.5)))
        lx, ly = uni(-0.5, 0.5), uni(-0.8, -0.2)  # light from above
        light = torch.tensor([lx, ly, 1.0])
        light = light / light.norm()
        lambert = (normal * light[:, None, None]).sum(0).clamp_min(0.0)
        shade = 0.25 + 0.75 * lambert
        haze = torch.exp(-0.12 * (depth - 2.0))
        image = albedo * shade * haze + (1 - haze) * 0.6
        image = image + 0.02 * torch.randn(3, H, W, generator=g)
        return image.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"SyntheticScenes(n={self.n}, size={self.size}, seed={self.seed}, classes={self.classes}, split={self.split!r})"


def _shape(shape: str, du, dv, dc: float, scale: float, uni):
    """One shape centred at offsets (du, dv), depth ``dc``: its mask, depth and depth gradient."""
    if shape == "disc":
        rho2 = du * du + dv * dv
        inside = rho2 < scale * scale
        s = torch.sqrt((scale * scale - rho2).clamp_min(1e-6))
        return inside, dc - s, du / s, dv / s  # gradient of the sphere's depth
    theta = uni(0.0, math.pi)
    ct, st = math.cos(theta), math.sin(theta)
    x, y = ct * du + st * dv, -st * du + ct * dv  # shape-aligned coordinates
    if shape == "rectangle":
        aspect = uni(0.5, 1.0)
        inside = (x.abs() < scale) & (y.abs() < scale * aspect)
    elif shape == "triangle":
        # equilateral: three half-planes at 120 degrees
        r = scale * 0.8
        inside = (y < r) & (y * -0.5 + x * 0.8660254 < r) & (y * -0.5 - x * 0.8660254 < r)
    else:  # diamond (rhombus)
        inside = x.abs() / scale + y.abs() / (0.55 * scale) < 1.0
    tu, tv = uni(-0.6, 0.6), uni(-0.6, 0.6)
    return inside, dc + tu * du + tv * dv, torch.full_like(du, tu), torch.full_like(du, tv)


def _z_buffer(surfaces_d: list, surfaces_n: list, surfaces_c: list):
    """Depth, unit normal and class of the nearest surface at each pixel."""
    depth_all = torch.stack(surfaces_d)  # (S, H, W)
    depth, idx = depth_all.min(dim=0)  # z-buffer: nearest surface wins
    gu_all = torch.stack([s[0] for s in surfaces_n])
    gv_all = torch.stack([s[1] for s in surfaces_n])
    gu = gu_all.gather(0, idx[None])[0]
    gv = gv_all.gather(0, idx[None])[0]
    inv = torch.rsqrt(gu * gu + gv * gv + 1.0)  # (vector_norm over dim 0 is slow on CPU)
    normal = torch.stack([gu * inv, gv * inv, inv])
    seg = torch.tensor(surfaces_c)[idx]
    return depth, normal, seg
