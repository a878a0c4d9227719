"""A FractalDB-style corpus, rendered offline from one seed: formula-driven images for supervised pretraining.

Each class is an iterated function system (IFS): 2 to 4 random affine maps ``w_k(p) = A_k p + b_k`` (Kataoka et
al., "Pre-training without Natural Images", ACCV 2020). The maps are sampled by their singular values under the
sigma-factor constraint of Anderson & Farrell ("Improving Fractal Pre-training", WACV 2022): with ``A_k = U_k
diag(s_k1, s_k2) V_k`` and ``1 >= s_k1 >= s_k2 >= 0``, the weighted sum ``sum_k (s_k1 + 2 s_k2)`` is drawn from
``U((5 + N) / 2, (6 + N) / 2)`` for ``N`` maps, the range where systems are neither dust (too contractive) nor
blobs (too little). A cheap filter on the fill ratio of a rendering rejects the rare degenerate system left.

Each image renders its class's IFS by the chaos game, many particles at once in numpy, with per-instance variation:
jittered map parameters, a random rotation, flip, scale and position, a random colour per map (each point takes the
colour of the map that produced it), and a random background. Classes therefore differ by shape only. Everything
derives from one seed, and class ``c`` is the same whatever the number of classes. The corpus is cached as a .npz.

    python benchmarks/fractals.py --classes 16 --images-per-class 8 --grid fractals.png   # a look, and the speed
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from adaptive_depth import ConfigError

__all__ = ["Corpus", "CorpusSettings", "generate", "load_or_generate", "render_class", "sample_system", "save_grid"]

logger = logging.getLogger(__name__)

VERSION = 2  # part of the cache file name: bump when the rendering changes, so stale caches are not reused
MIN_MAPS, MAX_MAPS = 2, 4
PARTICLES, STEPS, BURN_IN = 256, 40, 12  # 7,168 points per image, after the particles have reached the attractor
FILL_RANGE = (0.06, 0.6)  # occupied share of the attractor's bounding square at 32 px: below, dust; above, a blob
# Per-instance pose: a rotation within +-15 degrees, a horizontal flip, a scale of 0.7 to 1 and a position. Measured
# (regnetx_002, 32 classes x 400 images, 800 steps): +-45 degrees halved held-out accuracy (42% against 72%), the
# network spending its capacity on rotation invariance rather than on shape.
MAX_ROTATION = np.pi / 12
FLIP_PROBABILITY = 0.5
MARGIN = 0.08  # of the canvas on each side, so that the evaluation centre crop (87.5%) keeps the whole fractal


@dataclass(frozen=True)
class CorpusSettings:
    """What defines a corpus; two equal settings give bitwise equal images."""

    num_classes: int = 256
    images_per_class: int = 200
    image_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("num_classes", 2), ("images_per_class", 1), ("image_size", 8)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def key(self) -> str:
        """The cache file's stem."""
        return f"fractals-v{VERSION}-c{self.num_classes}-n{self.images_per_class}-{self.image_size}px-seed{self.seed}"


@dataclass
class Corpus:
    """Rendered images, ``(num_classes * images_per_class, H, W, 3)`` uint8, class-major, and their labels.

    ``systems`` holds each class's maps as rows ``[theta_u, theta_v, s1, s2, reflection, b_x, b_y]`` (NaN rows pad
    classes with fewer than ``MAX_MAPS`` maps).
    """

    settings: CorpusSettings
    images: np.ndarray
    labels: np.ndarray
    systems: np.ndarray


def sample_singular_values(rng: np.random.Generator, num_maps: int, sigma_factor: float) -> np.ndarray:
    """``(num_maps, 2)`` singular values with ``1 >= s1 >= s2 >= 0`` and ``sum(s1 + 2 s2) == sigma_factor``.

    Drawn pair by pair, each uniformly within the bounds that still let the remaining pairs (each adding at most 3)
    reach the total; the last pair takes what is left.
    """
    if not 0 < sigma_factor < 3 * num_maps:
        raise ConfigError(f"sigma_factor must be in (0, {3 * num_maps}) for {num_maps} maps, got {sigma_factor!r}")
    values = np.empty((num_maps, 2))
    left = sigma_factor
    for k in range(num_maps - 1):
        rest = 3.0 * (num_maps - 1 - k)  # the most the later pairs can add
        s1 = rng.uniform(max(0.0, (left - rest) / 3), min(1.0, left))
        s2 = rng.uniform(max(0.0, (left - rest - s1) / 2), min(s1, (left - s1) / 2))
        values[k] = s1, s2
        left -= s1 + 2 * s2
    s2 = rng.uniform(max(0.0, (left - 1) / 2), left / 3)
    values[-1] = left - 2 * s2, s2
    return values


def sample_system(rng: np.random.Generator, num_maps: int) -> np.ndarray:
    """One IFS: ``(num_maps, 7)`` rows ``[theta_u, theta_v, s1, s2, reflection, b_x, b_y]`` (Anderson & Farrell).

    ``A = R(theta_u) diag(s1, reflection * s2) R(theta_v)`` covers every 2x2 matrix with these singular values.
    """
    sigma_factor = rng.uniform((5 + num_maps) / 2, (6 + num_maps) / 2)
    system = np.empty((num_maps, 7))
    system[:, :2] = rng.uniform(-np.pi, np.pi, (num_maps, 2))
    system[:, 2:4] = sample_singular_values(rng, num_maps, sigma_factor)
    system[:, 4] = rng.choice([-1.0, 1.0], num_maps)
    system[:, 5:] = rng.uniform(-1.0, 1.0, (num_maps, 2))
    return system


def _coefficients(systems: np.ndarray) -> np.ndarray:
    """``(..., N, 7)`` parameters to ``(..., N, 6)`` affine coefficients ``[a, b, c, d, e, f]``.

    The map is ``x' = a x + b y + e``, ``y' = c x + d y + f``.
    """
    tu, tv, s1, s2, refl, bx, by = np.moveaxis(systems, -1, 0)
    cu, su, cv, sv = np.cos(tu), np.sin(tu), np.cos(tv), np.sin(tv)
    m00, m01, m10, m11 = s1 * cv, -s1 * sv, refl * s2 * sv, refl * s2 * cv  # diag(s1, r s2) R(theta_v)
    return np.stack([cu * m00 - su * m10, cu * m01 - su * m11, su * m00 + cu * m10, su * m01 + cu * m11, bx, by], -1)


def _chaos_game(systems: np.ndarray, rng: np.random.Generator, particles: int = PARTICLES, steps: int = STEPS):
    """Points of ``I`` IFS at once: ``(I, points)`` x, y and the index of the map that produced each point.

    Every particle picks a map at every step with probability proportional to ``|det A|`` (the map's share of the
    attractor's area), floored so that a thin map still gets drawn.
    """
    count, num_maps = systems.shape[:2]
    coef = _coefficients(systems).reshape(count * num_maps, 6)
    det = np.abs(systems[..., 2] * systems[..., 3])
    prob = np.maximum(det, 0.05 * det.sum(-1, keepdims=True) / num_maps)
    cdf = np.cumsum(prob / prob.sum(-1, keepdims=True), -1)[:, None, :-1]  # (I, 1, N - 1)
    x, y = rng.uniform(-1.0, 1.0, (2, count, particles))
    offset = (np.arange(count) * num_maps)[:, None]
    kept = steps - BURN_IN
    xs, ys = np.empty((2, kept, count, particles))
    ks = np.empty((kept, count, particles), dtype=np.int64)
    for step in range(steps):
        k = (rng.random((count, particles))[..., None] >= cdf).sum(-1)
        c = coef[k + offset]  # (I, P, 6): each particle's map
        x, y = c[..., 0] * x + c[..., 1] * y + c[..., 4], c[..., 2] * x + c[..., 3] * y + c[..., 5]
        if step >= BURN_IN:
            xs[step - BURN_IN], ys[step - BURN_IN], ks[step - BURN_IN] = x, y, k
    flat = (count, kept * particles)
    return xs.transpose(1, 0, 2).reshape(flat), ys.transpose(1, 0, 2).reshape(flat), ks.transpose(1, 0, 2).reshape(flat)


def _counts(x: np.ndarray, y: np.ndarray, k: np.ndarray, size: int, num_maps: int) -> np.ndarray:
    """Points per (image, map, row, column) on a ``size`` x ``size`` canvas; points outside are dropped."""
    count = x.shape[0]
    col, row = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    inside = (col >= 0) & (col < size) & (row >= 0) & (row < size)
    image = np.broadcast_to(np.arange(count)[:, None], x.shape)
    index = ((image * num_maps + k) * size + row) * size + col
    return np.bincount(index[inside], minlength=count * num_maps * size * size).reshape(count, num_maps, size, size)


def fill_ratio(system: np.ndarray, rng: np.random.Generator, size: int = 32) -> float:
    """Share of the pixels of the attractor's bounding square that its points cover (the degeneracy filter)."""
    x, y, k = _chaos_game(system[None], rng, particles=512)
    span = max(np.ptp(x), np.ptp(y)) if np.isfinite(x).all() and np.isfinite(y).all() else 0.0
    if span < 1e-9:  # diverged, or collapsed to a point
        return 0.0
    scale = size * (1 - 1e-6) / span
    counts = _counts((x - x.min()) * scale, (y - y.min()) * scale, np.zeros_like(k), size, 1)
    return float((counts > 0).mean())


def class_system(seed: int, label: int) -> np.ndarray:
    """The IFS of class ``label``: the first system its own random stream draws that passes the fill filter."""
    rng = np.random.default_rng([seed, 0, label])
    for _ in range(1000):
        system = sample_system(rng, int(rng.integers(MIN_MAPS, MAX_MAPS + 1)))
        if FILL_RANGE[0] <= fill_ratio(system, rng) <= FILL_RANGE[1]:
            return system
    raise RuntimeError(f"no IFS passed the fill filter {FILL_RANGE} in 1000 draws (seed {seed}, class {label})")


def render_class(system: np.ndarray, count: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` renderings of one IFS as ``(count, image_size, image_size, 3)`` uint8 RGB.

    Drawn at twice the size and averaged down 2x2, so thin structures become soft grey levels, not aliasing.
    """
    num_maps = system.shape[0]
    systems = np.repeat(system[None], count, 0)  # per-instance jitter of every map's parameters
    systems[..., :2] += rng.normal(0.0, 0.06, (count, num_maps, 2))
    systems[..., 2:4] = np.minimum(systems[..., 2:4] * np.exp(rng.normal(0.0, 0.05, (count, num_maps, 2))), 1.0)
    systems[..., 5:] += rng.normal(0.0, 0.05, (count, num_maps, 2))
    x, y, k = _chaos_game(systems, rng)
    # Pose: rotation, flip, then the robust bounding box fitted into the canvas at a random scale and position.
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION, (count, 1))
    flip = np.where(rng.random((count, 1)) < FLIP_PROBABILITY, -1.0, 1.0)
    x, y = flip * (np.cos(angle) * x - np.sin(angle) * y), np.sin(angle) * x + np.cos(angle) * y
    (x_lo, x_hi), (y_lo, y_hi) = np.quantile(x, [0.005, 0.995], axis=1), np.quantile(y, [0.005, 0.995], axis=1)
    canvas = 2 * image_size
    usable = canvas * (1 - 2 * MARGIN)
    span = np.maximum(np.maximum(x_hi - x_lo, y_hi - y_lo), 1e-9)
    scale = usable * rng.uniform(0.7, 1.0, count) / span
    shift = rng.uniform(-1.0, 1.0, (2, count)) * (usable - np.stack([x_hi - x_lo, y_hi - y_lo]) * scale) / 2
    x = (x - ((x_lo + x_hi) / 2)[:, None]) * scale[:, None] + (canvas / 2 + shift[0])[:, None]
    y = (y - ((y_lo + y_hi) / 2)[:, None]) * scale[:, None] + (canvas / 2 + shift[1])[:, None]
    counts = _counts(x, y, k, canvas, num_maps)
    counts = counts.reshape(count, num_maps, image_size, 2, image_size, 2).sum((3, 5)).astype(np.float32)
    # Colour: each map a random colour, pushed away from the background's brightness so the shape stays visible;
    # opacity grows with the point density (relative to the image's mean over covered pixels).
    background = rng.uniform(0.0, 1.0, (count, 1, 1, 3)).astype(np.float32) * rng.uniform(0.2, 1.0, (count, 1, 1, 1))
    gradient = rng.normal(0.0, 0.15, (count, 2, 1, 1, 3)).astype(np.float32)
    ramp = np.linspace(-0.5, 0.5, image_size, dtype=np.float32)
    background = background + gradient[:, 0] * ramp[None, :, None, None] + gradient[:, 1] * ramp[None, None, :, None]
    colours = rng.uniform(0.0, 1.0, (count, num_maps, 3)).astype(np.float32)
    too_close = np.abs(colours.mean(-1) - background.mean((1, 2, 3))[:, None]) < 0.3
    colours[too_close] = 1.0 - colours[too_close]
    density = counts.sum(1)
    mix = np.einsum("inhw,inc->ihwc", counts, colours) / np.maximum(density, 1.0)[..., None]
    covered = np.maximum((density > 0).sum((1, 2)), 1)
    tau = 0.3 * density.sum((1, 2)) / covered
    alpha = (1.0 - np.exp(-density / tau[:, None, None]))[..., None]
    image = background * (1.0 - alpha) + mix * alpha
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def generate(settings: CorpusSettings) -> Corpus:
    """Render the whole corpus, class by class (each class from its own random streams)."""
    n, size = settings.images_per_class, settings.image_size
    images = np.empty((settings.num_classes * n, size, size, 3), dtype=np.uint8)
    systems = np.full((settings.num_classes, MAX_MAPS, 7), np.nan)
    start = time.perf_counter()
    for label in range(settings.num_classes):
        system = class_system(settings.seed, label)
        systems[label, : len(system)] = system
        rng = np.random.default_rng([settings.seed, 1, label])
        images[label * n : (label + 1) * n] = render_class(system, n, size, rng)
        if (label + 1) % 32 == 0 or label + 1 == settings.num_classes:
            seconds = time.perf_counter() - start
            logger.info(
                "rendered %d/%d classes (%.0f images/s)", label + 1, settings.num_classes, (label + 1) * n / seconds
            )
    labels = np.repeat(np.arange(settings.num_classes), n)
    return Corpus(settings, images, labels, systems)


def load_or_generate(settings: CorpusSettings, cache_dir: str | Path) -> tuple[Corpus, Path, bool]:
    """The corpus from ``cache_dir/<settings.key>.npz`` if there, else rendered and saved there.

    Returns the corpus, the cache file and whether it was rendered now.
    """
    path = Path(cache_dir) / f"{settings.key}.npz"
    if path.is_file():
        with np.load(path) as saved:
            return Corpus(settings, saved["images"], saved["labels"], saved["systems"]), path, False
    corpus = generate(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")  # a crash never leaves a truncated cache
    np.savez_compressed(partial, images=corpus.images, labels=corpus.labels, systems=corpus.systems)
    partial.replace(path)
    return corpus, path, True


def save_grid(corpus: Corpus, path: str | Path, *, classes: int = 8, instances: int = 8, zoom: int = 3) -> Path:
    """A PNG of the first ``classes`` classes (rows) by ``instances`` instances (columns), enlarged ``zoom`` times."""
    n, size = corpus.settings.images_per_class, corpus.settings.image_size
    classes, instances = min(classes, corpus.settings.num_classes), min(instances, n)
    gap = 2
    cell = size * zoom + gap
    grid = Image.new("RGB", (instances * cell + gap, classes * cell + gap), (255, 255, 255))
    for row in range(classes):
        for col in range(instances):
            tile = Image.fromarray(corpus.images[row * n + col]).resize((size * zoom, size * zoom), Image.NEAREST)
            grid.paste(tile, (gap + col * cell, gap + row * cell))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return Path(path)


def main(argv: list[str] | None = None) -> Corpus:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=CorpusSettings.num_classes)
    p.add_argument("--images-per-class", type=int, default=CorpusSettings.images_per_class)
    p.add_argument("--image-size", type=int, default=CorpusSettings.image_size)
    p.add_argument("--seed", type=int, default=CorpusSettings.seed)
    p.add_argument("--grid", type=Path, default=Path("out/pretrain/fractals.png"), help="sample grid PNG")
    args = p.parse_args(argv)
    try:
        settings = CorpusSettings(args.classes, args.images_per_class, args.image_size, args.seed)
    except ConfigError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    corpus = generate(settings)
    seconds = time.perf_counter() - start
    print(f"{len(corpus.images)} images in {seconds:.1f} s ({len(corpus.images) / seconds:.0f} images/s)")
    print(f"sample grid: {save_grid(corpus, args.grid, classes=min(16, args.classes))}")
    return corpus


if __name__ == "__main__":
    main()
