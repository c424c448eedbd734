"""Per-seed sampling, image conversion at the edges, grids and latent interpolation.

An image depends only on its seed and the weights: each seed gets its own torch.Generator, and the
families run their networks at a fixed micro-batch (models/base.py), so the batch size a user picks
changes speed, never pixels.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .config import MAX_SEED, Range
from .data.dataset import norm_name
from .data.folder import list_images, load_image
from .errors import ConfigError, DataError, ImageFileError
from .models.base import Family

MAX_SEEDS = 100_000  # images per command; more is almost surely a typo in a range
MAX_EXTEND_SIDE = 256  # inpaint / outpaint canvas side: the models are trained on small images
# Documented ranges of the sampling commands' numbers (the CLI's argparse types use them too).
SEED = Range(0, MAX_SEED)
FRAMES = Range(2, 1024)
PAD = Range(1, MAX_EXTEND_SIDE)
BATCH_SIZE = Range(1, 4096)


def parse_seeds(text: str) -> list[int]:
    """'0-63' -> [0..63]; '3,9,12-14' -> [3, 9, 12, 13, 14]."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            a = int(lo)
            b = int(hi) if dash else a
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: {part!r} is not a seed or a range like 0-63") from None
        if b < a:
            raise ConfigError(f"--seeds {text!r}: range {part} runs backwards")
        for s in (a, b):  # a part is a contiguous range, so its ends bound every seed in it
            SEED.check(s, "--seeds: a seed")
        if b - a + 1 + len(seeds) > MAX_SEEDS:
            raise ConfigError(f"--seeds {text!r}: more than {MAX_SEEDS} seeds in one command")
        seeds.extend(range(a, b + 1))
    return seeds


def parse_labels(text: str, classes: Sequence[str], n: int) -> torch.Tensor:
    """'sneaker' or '7' (one class for all n images) or 'sneaker,bag,0' (one per image) -> n class indices.

    Names match case-insensitively, ignoring spaces and punctuation ('ankle-boot' is 'Ankle boot')."""
    if not classes:
        raise ConfigError("--labels: this model is not class-conditional (its data had no classes)")
    by_name = {norm_name(c): i for i, c in enumerate(classes)}
    out = []
    for part in [p.strip() for p in text.split(",")]:
        if part.lstrip("-").isdigit():
            i = int(part)
            if not 0 <= i < len(classes):
                raise ConfigError(f"--labels: {i} is out of range (classes are 0..{len(classes) - 1})")
        elif norm_name(part) in by_name:
            i = by_name[norm_name(part)]
        else:
            raise ConfigError(f"--labels: unknown class {part!r} (classes: {', '.join(classes)})")
        out.append(i)
    if len(out) == 1:
        out *= n
    if len(out) != n:
        raise ConfigError(f"--labels: {len(out)} labels for {n} seeds (give one, or one per seed)")
    return torch.tensor(out, dtype=torch.long)


def resolve_labels(model: Family, classes: Sequence[str], text: str | None, seeds: Sequence[int],
                   what: str = "--labels") -> torch.Tensor | None:
    """The labels for `seeds`: parsed from `text` (parse_labels), or the defaults when it is None."""
    if text is None:
        return default_labels(model, seeds)
    if not model.conditional:
        raise ConfigError(f"{what}: this {model.name} model is not class-conditional")
    return parse_labels(text, classes, len(seeds))


def check_options(model: Family, given: dict, prefix: str = "--") -> dict:
    """`given` sampling options, refused (naming the first) when the model's family does not have them or
    a value is outside the family's own range or choices."""
    unknown = sorted(set(given) - set(model.sample_options))
    if unknown:
        have = ", ".join(f"{prefix}{k}" for k in model.sample_options) or "none"
        raise ConfigError(f"{prefix}{unknown[0]} does not apply to a {model.name} model (its options: {have})")
    return {k: model.sample_options[k].check(v, f"{prefix}{k}") for k, v in given.items()}


def default_labels(model: Family, seeds: Sequence[int]) -> torch.Tensor | None:
    """For a conditional model given no labels: class = seed mod number of classes (every class shows)."""
    return torch.tensor([s % model.num_classes for s in seeds]) if model.conditional else None


def seed_generators(seeds: Iterable[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


MAX_LATENT_SHIFT = 10.0


def check_latent(model: Family, latent: Sequence[float] | None) -> list[float] | None:
    """A latent shift: at most z_dim finite values in [-MAX_LATENT_SHIFT, MAX_LATENT_SHIFT], for the
    families whose images come from one latent vector (GANs, VAEs)."""
    if latent is None or len(latent) == 0:
        return None
    if not model.has_latent:
        raise ConfigError(f"--latent does not apply to a {model.name} model (it has no single latent vector)")
    z_dim = model.cfg.z_dim
    if len(latent) > z_dim:
        raise ConfigError(f"--latent: {len(latent)} values for a {z_dim}-dimensional latent")
    bad = [v for v in latent if not (math.isfinite(v) and abs(v) <= MAX_LATENT_SHIFT)]
    if bad:
        raise ConfigError(f"--latent: values must be in [-{MAX_LATENT_SHIFT:g}, {MAX_LATENT_SHIFT:g}], got {bad[0]:g}")
    return [float(v) for v in latent]


def parse_floats(text: str, what: str = "--latent") -> list[float]:
    """'0.5,-1' -> [0.5, -1.0] (ConfigError naming the bad value otherwise)."""
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected numbers like 0.5,-1, got {text!r}") from None


def prompt_text(model: Family, prompts: str | Sequence[str] | None, n: int,
                negative_prompt: str | None = None) -> tuple[object, object]:
    """(text, negative) for a text model's `sample`: the prompts (one for all n images, or one per image)
    and the negative prompt encoded (imagegen/text.py); (None, None) when neither is given. A prompt that
    is empty or too long, a count that is not n, or a prompt for a model without text is a ConfigError."""
    if prompts is None and negative_prompt is None:
        return None, None
    if not model.reads_text:
        what = "--prompt" if prompts is not None else "--negative-prompt"
        raise ConfigError(f"this {model.name} model was not trained on captions: it takes no {what}")
    from .text import MAX_TOKENS, check_prompt, encode
    text = negative = None
    if prompts is not None:
        prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
        if len(prompts) != n:
            raise ConfigError(f"got {len(prompts)} prompts for {n} seeds (give one, or one per seed)")
        distinct = sorted({check_prompt(p) for p in prompts})
        row = {p: i for i, p in enumerate(distinct)}
        text = encode(distinct).padded(MAX_TOKENS)[torch.tensor([row[p] for p in prompts], dtype=torch.long)]
    if negative_prompt is not None:
        negative = encode([check_prompt(negative_prompt, "--negative-prompt")]).padded(MAX_TOKENS)[[0] * n]
    return text, negative


def generate(model: Family, seeds: Sequence[int], *, labels: torch.Tensor | None = None,
             batch_size: int = 64, latent: Sequence[float] | None = None, prompts: str | Sequence[str] | None = None,
             negative_prompt: str | None = None, **opts) -> torch.Tensor:
    """One image per seed: len(seeds) x C x H x W in [-1, 1], on the CPU. `latent` shifts the first
    dimensions of each seed's latent vector (the web page's sliders), for GANs and VAEs; `prompts` (one,
    or one per seed) and `negative_prompt` steer a text model."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if len(seeds) == 0:
        raise ConfigError("no seeds given: generate draws one image per seed")
    latent = check_latent(model, latent)
    text, negative = prompt_text(model, prompts, len(seeds), negative_prompt)
    if latent and opts.get("drs"):
        raise ConfigError("--latent and --drs cannot be combined (rejection sampling draws its own latents)")
    # Noise is drawn on the CPU so that a seed gives the same image on every device.
    out = []
    for i in range(0, len(seeds), batch_size):
        chunk = list(seeds[i:i + batch_size])
        lab = None if labels is None else labels[i:i + batch_size]
        gens = seed_generators(chunk)
        if latent:
            noise = model.draw_noise(len(chunk), gens)                     # chunk x z_dim, per seed
            noise[:, :len(latent)] += torch.tensor(latent, device=noise.device)
            opts = {**opts, "noise": noise}
        words = {} if text is None else {"text": text[i:i + batch_size]}
        if negative is not None:
            words["negative"] = negative[i:i + batch_size]
        out.append(model.sample(len(chunk), labels=lab, generator=gens, **opts, **words).cpu())
    return out[0] if len(out) == 1 else torch.cat(out)


def preview(model: Family, dataset, n: int) -> tuple[torch.Tensor, int | None]:
    """The images of a run's training grids and how many per row. A translation family and an
    autoencoder show their own (`model.preview`: inputs, translations, reconstructions); any other draws seeds 0..n-1, for a
    conditional family one class per column (n rounded up to a multiple of the classes); a text model
    draws seed i for the data's caption i."""
    if model.translates or model.autoencodes:
        return model.preview(dataset, n)
    if model.reads_text and getattr(dataset, "captioned", False):
        n = min(n, len(dataset.captions))
        return generate(model, list(range(n)), prompts=dataset.captions[:n]), None
    k = model.num_classes
    n = n if not k else k * math.ceil(n / k)
    return generate(model, list(range(n)), labels=torch.arange(n) % k if k else None), k or None


def quantize(images: torch.Tensor) -> torch.Tensor:
    """N x C x H x W in [-1, 1] -> the same layout in uint8 on the CPU (the only place floats become bytes)."""
    return images.detach().cpu().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N x C x H x W in [-1, 1] -> N x H x W x C uint8, for image files."""
    return quantize(images).permute(0, 2, 3, 1).numpy()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x C x H x W -> float in [-1, 1]: the inverse of to_uint8's scaling, for data read at the edge."""
    return images.float() / 127.5 - 1


def to_pil(image_hwc: np.ndarray) -> Image.Image:
    return Image.fromarray(image_hwc[:, :, 0] if image_hwc.shape[2] == 1 else image_hwc)


def save_images(images: torch.Tensor, out_dir: str | Path, seeds: Sequence[int]) -> list[Path]:
    """One PNG per seed: out_dir/seed000042.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for arr, s in zip(to_uint8(images), seeds):
        p = out_dir / f"seed{s:06d}.png"
        to_pil(arr).save(p)
        paths.append(p)
    return paths


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile N images into one PIL image, nrow per row (default: as square as possible)."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = arr[i]
    img = to_pil(canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between latents a and b (1 x D each) at fractions t (T) -> T x D.

    Gaussian latents live near a sphere; a straight line between two of them passes through
    low-norm, atypical latents, so interpolation follows the great circle instead."""
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    omega = torch.acos((an * bn).sum(1).clamp(-1, 1))            # 1
    so = torch.sin(omega)
    t = t[:, None]
    if so.abs().item() < 1e-6:
        return (1 - t) * a + t * b
    return torch.sin((1 - t) * omega) / so * a + torch.sin(t * omega) / so * b


def interpolate(model: Family, seed_a: int, seed_b: int, frames: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """`frames` images along the latent path from seed_a's latent to seed_b's (both ends included).
    labels: one class for every frame of a conditional model (default: seed_a's default class)."""
    FRAMES.check(frames, "--frames")
    if not model.has_latent:
        raise ConfigError(f"model family {model.name!r} has no latent space to interpolate")
    za, zb = model.draw_noise(1, seed_generators([seed_a])), model.draw_noise(1, seed_generators([seed_b]))
    z = slerp(za.flatten(1), zb.flatten(1), torch.linspace(0, 1, frames, device=za.device)).view(frames, *za.shape[1:])
    if model.conditional:
        labels = (default_labels(model, [seed_a]) if labels is None else labels).reshape(1).expand(frames)
    return model.sample(frames, noise=z, labels=labels)


def interpolate_images(model: Family, image_a: torch.Tensor, image_b: torch.Tensor, frames: int,
                       labels: torch.Tensor | None = None) -> torch.Tensor:
    """`frames` decoded images along the straight line between the posterior means of two real images
    (each 1 x C x H x W), for families with an encoder (VAEs). labels: 1 class for both, or None."""
    FRAMES.check(frames, "--frames")
    if not model.encodes:
        raise ConfigError(f"model family {model.name!r} has no encoder: interpolate between seeds instead")
    with torch.no_grad():
        mu = model.encode(torch.cat([image_a, image_b]), None if labels is None else labels.expand(2))[0]
        t = torch.linspace(0, 1, frames, device=mu.device)[:, None]
        z = (1 - t) * mu[:1] + t * mu[1:]
        return model.sample(frames, noise=z, temperature=1.0, labels=None if labels is None else labels.expand(frames))


def read_image(path: str | Path, channels: int) -> torch.Tensor:
    """One image file -> 1 x channels x H x W in [-1, 1] (converted to gray or RGB as the model needs)."""
    return hwc_to_float(load_image(Path(path), None, channels))


def hwc_to_float(arr: np.ndarray) -> torch.Tensor:
    """One decoded image, H x W x C uint8 -> 1 x C x H x W float in [-1, 1]."""
    return to_float(torch.tensor(arr).permute(2, 0, 1)[None])           # a copy: PIL's arrays are read-only


def read_mask(path: str | Path, height: int, width: int) -> torch.Tensor:
    """A mask image -> 1 x 1 x H x W of 0/1, where 1 (white, >= 128) marks pixels to generate."""
    return to_mask(load_image(Path(path), None, 1), str(path), height, width)


def to_mask(arr: np.ndarray, name: str, height: int, width: int) -> torch.Tensor:
    """A decoded grayscale mask (H x W x 1 uint8) -> 1 x 1 x H x W of 0/1, white (>= 128) = generate;
    refused unless it matches the image's size and marks at least one pixel."""
    if arr.shape[:2] != (height, width):
        raise ConfigError(f"{name}: mask is {arr.shape[1]}x{arr.shape[0]}, the image {width}x{height}; "
                          "they must be the same size")
    mask = torch.from_numpy(arr[:, :, 0] >= 128).float()[None, None]
    if not mask.any():
        raise ConfigError(f"{name}: the mask has no white pixels, so there is nothing to fill in")
    return mask


SIDES = ("left", "right", "top", "bottom")


def outpaint_canvas(image: torch.Tensor, pad: int, sides: Sequence[str] = SIDES) -> tuple[torch.Tensor, torch.Tensor]:
    """The image on a canvas extended by `pad` pixels on each chosen side, and the mask of the new pixels."""
    PAD.check(pad, "--pad")
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        raise ConfigError(f"--sides: {bad[0] if bad else 'nothing'!r} is not a side (choose from {', '.join(SIDES)})")
    amounts = [pad if s in sides else 0 for s in SIDES]                   # F.pad order: left, right, top, bottom
    canvas = torch.nn.functional.pad(image, amounts, value=-1.0)
    mask = torch.nn.functional.pad(torch.zeros_like(image[:, :1]), amounts, value=1.0)
    return canvas, mask


def extend_image(model: Family, image: torch.Tensor, mask: torch.Tensor, seed: int,
                 labels: torch.Tensor | None = None, **opts) -> torch.Tensor:
    """Inpaint: pixels where mask == 1 generated, all others kept exactly. Needs a family with `inpaint`."""
    if not model.inpaints:
        raise ConfigError(f"model family {model.name!r} cannot inpaint or outpaint (use a ddpm run, or a vae or cvae run to inpaint)")
    unknown = sorted(set(opts) - set(inspect.signature(model.inpaint).parameters))
    if unknown:   # e.g. RePaint's `resample` asked of a VAE
        raise ConfigError(f"{model.name} inpainting has no option {', '.join(unknown)}")
    # Channels and mask shape are checked by the family's inpaint (Family.check_inpaint).
    if max(image.shape[-2:]) > MAX_EXTEND_SIDE:
        raise ConfigError(f"the canvas is {image.shape[-1]}x{image.shape[-2]}; the limit is {MAX_EXTEND_SIDE} px a side")
    SEED.check(seed, "--seed")
    return model.inpaint(image, mask, labels=labels, generator=seed_generators([seed]), **opts).cpu()


def read_images(path: str | Path, size: int, channels: int) -> tuple[list[Path], torch.Tensor, list[tuple[str, str]], list[str]]:
    """The images to translate: one file, or every image under a folder (recursively), each resized and
    centre-cropped to size x size with `channels` channels. Returns (paths relative to the input, so
    outputs keep their names; N x C x size x size in [-1, 1]; skipped (file, reason); converted files).
    A bad file in a folder is skipped and reported; a bad single file is an error."""
    root = Path(path)
    converted: list[str] = []
    if root.is_file():
        return [Path(root.name)], hwc_to_float(load_image(root, size, channels, converted)), [], converted
    if not root.is_dir():
        raise DataError(f"{root}: no such file or folder")
    files, skipped, _ = list_images(root, classes=False)
    names, arrays = [], []
    for f, _ in files:
        try:
            arrays.append(load_image(f, size, channels, converted))
            names.append(f.relative_to(root.resolve()))
        except ImageFileError as e:
            skipped.append((str(f), str(e).removeprefix(f"{f}: ")))
    if not arrays:
        raise DataError(f"{root}: no readable images ({len(skipped)} skipped)")
    return names, to_float(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)), skipped, converted


def save_named(images: torch.Tensor, out_dir: str | Path, names: Sequence[Path]) -> list[Path]:
    """Write image i to out_dir / names[i] (subfolders created; the format follows the extension)."""
    paths = []
    for arr, name in zip(to_uint8(images), names):
        p = Path(out_dir) / name
        p.parent.mkdir(parents=True, exist_ok=True)
        to_pil(arr).save(p)
        paths.append(p)
    return paths
