"""`imagegen sample`, `interpolate`, `vary`, `breed`, `inpaint`, `outpaint` and `translate`: each
command's flags beside its handler."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..checkpoint import load_run
from ..config import Range
from ..directions import direction_shift
from ..requests import InpaintRequest, InterpolateRequest, SampleRequest, TranslateRequest, VaryRequest
from ..runtime.engine import use_engine
from ..errors import ConfigError
from ..models.denoising import RESAMPLE, STRENGTH
from ..sample import (BATCH_SIZE, FRAMES, PAD, SEED, SIDES, extend_image, generate, grid, interpolate, interpolate_images,
                      outpaint_canvas, parse_floats, parse_seeds, read_image, read_images, read_mask, save_images,
                      save_named, to_pil, to_uint8)
from ..vary import MIX, breed
from .options import LABELS_HELP, add_engine, add_number, add_sample_options, given_options, prompts_of


def add_commands(sub) -> None:
    p = sub.add_parser("sample", help="one PNG per seed from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--seeds", default="0-63", help="e.g. 0-63 or 3,9,12-14")
    p.add_argument("--out", required=True, help="folder for seedNNNNNN.png files")
    p.add_argument("--grid", help="also write all images as one grid PNG")
    add_number(p, "--batch-size", BATCH_SIZE, "images per forward pass (speed only; pixels do not change)", default=64)
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--labels", help=LABELS_HELP)
    p.add_argument("--latent", help="shift the first latent dimensions of every seed, e.g. 0.5,-1 (GANs, VAEs)")
    p.add_argument("--directions", help="move every seed's latent along the model's principal directions "
                   "(GANSpace), e.g. 1.5,0,-2 (GANs, VAEs; each in [-5, 5])")
    p.add_argument("--prompt", help="what to draw, for a model trained on captions, e.g. 'a red star left of a blue circle'")
    p.add_argument("--prompts", metavar="FILE", help="a text file with one prompt per seed, one per line")
    p.add_argument("--negative-prompt", help="what to steer away from (replaces guidance's unconditional branch)")
    add_engine(p)
    add_sample_options(p)
    p.set_defaults(handler=cmd_sample)

    p = sub.add_parser("interpolate", help="a strip of images through latent space between two seeds (or two images, VAEs)")
    p.add_argument("run_dir")
    p.add_argument("--seeds", help="two seeds, e.g. 3,9")
    p.add_argument("--images", help="two image files, e.g. a.png,b.png (families with an encoder: vae, cvae)")
    p.add_argument("--labels", help="the class of every frame (conditional families)")
    add_number(p, "--frames", FRAMES, "images in the strip, both ends included", default=8)
    p.add_argument("--out", required=True, help="PNG file")
    add_engine(p)
    p.set_defaults(handler=cmd_interpolate)

    for name, what in (("vary", "variations of one image, a seed's or a file's: latent steps (GANs, VAEs), SDEdit (ddpm, flow, consistency)"),
                       ("breed", "variations of the blend of two parents (seeds or image files)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("run_dir")
        if name == "vary":
            add_number(p, "--seed", SEED, "the seed whose image to vary")
            p.add_argument("--image", dest="image_files", help="or an image file to vary (a sketch, say)")
        else:
            p.add_argument("--parents", help="two seeds, e.g. 3,9")
            p.add_argument("--images", dest="image_files", help="or two image files, e.g. a.png,b.png")
            add_number(p, "--mix", MIX, "how far from the first parent to the second (default 0.5)", default=0.5)
        add_number(p, "--strength", STRENGTH, "how far from the source: small = close, 1 = a new image (default 0.5)",
                   default=0.5)
        p.add_argument("--seeds", default="0-15", help="one variation per seed, e.g. 0-15")
        p.add_argument("--out", required=True, help="folder for seedNNNNNN.png files")
        p.add_argument("--grid", help="also write all images as one grid PNG")
        add_number(p, "--batch-size", BATCH_SIZE, "images per forward pass (speed only; pixels do not change)", default=64)
        p.add_argument("--labels", help="the class of every variation (conditional families)")
        p.add_argument("--prompt", help="the prompt of every variation (text models)")
        p.add_argument("--negative-prompt", help="what to steer away from (text models)")
        add_sample_options(p)
        add_engine(p)
        p.set_defaults(handler=cmd_vary)

    for name, what in (("inpaint", "fill the white pixels of --mask in --image (diffusion, VAE)"),
                       ("outpaint", "extend --image by --pad pixels on the chosen --sides (diffusion)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("run_dir")
        p.add_argument("--image", required=True, help="PNG/JPEG/WebP input (converted to the model's channels)")
        if name == "inpaint":
            p.add_argument("--mask", required=True, help="same size as --image: white = generate, black = keep")
        else:
            add_number(p, "--pad", PAD, "pixels to add on each chosen side", default=8)
            p.add_argument("--sides", default=",".join(SIDES), help="comma list of left, right, top, bottom")
        p.add_argument("--out", required=True, help="PNG file")
        add_number(p, "--seed", SEED, "the seed of the generated pixels", default=0)
        p.add_argument("--labels", help="the class to generate (conditional models)")
        add_number(p, "--resample", RESAMPLE, "RePaint resampling passes per step (default 5)")
        add_sample_options(p, only=InpaintRequest.OPTIONS)
        add_engine(p)
        p.set_defaults(handler=cmd_inpaint if name == "inpaint" else cmd_outpaint)

    p = sub.add_parser("translate", help="translate images to the other domain with a cyclegan run")
    p.add_argument("run_dir")
    p.add_argument("--direction", default="a2b", choices=["a2b", "b2a"], help="a2b (default) or b2a")
    p.add_argument("--input", required=True, help="one image, or a folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="folder for the translated images (same file names)")
    p.add_argument("--grid", help="also write a PNG with rows input / translated / reconstructed")
    add_number(p, "--grid-images", Range(1, 256), "images in the --grid (default 16)", default=16)
    add_engine(p)
    p.set_defaults(handler=cmd_translate)


def save_png(image, path: str) -> None:
    """A PIL image written to `path` (a --grid or --out file), its folder made as --out folders are; a
    path that cannot be written is a ConfigError naming it."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, format="PNG")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot write the image ({e})") from None


def cmd_sample(a) -> int:
    seeds = parse_seeds(a.seeds)
    run = load_run(a.run_dir, weights=a.weights)
    use_engine(run.model, a.engine)
    ask = SampleRequest(seeds, labels=a.labels, prompt=prompts_of(a), negative_prompt=a.negative_prompt,
                        options=given_options(a), latent=parse_floats(a.latent) if a.latent else [],
                        directions=parse_floats(a.directions, "--directions") if a.directions else [])
    ready = ask.check(run)
    latent = direction_shift(run.model, ask.directions) if ask.directions else ready.latent
    images = generate(run.model, seeds, labels=ready.labels, batch_size=a.batch_size, latent=latent, prompts=ask.prompt,
                      negative_prompt=a.negative_prompt, **ready.options)
    paths = save_images(images, a.out, seeds)
    if a.grid:
        save_png(grid(images), a.grid)
    print(f"wrote {len(paths)} images to {a.out}" + (f" and a grid to {a.grid}" if a.grid else ""))
    return 0


def cmd_interpolate(a) -> int:
    run = load_run(a.run_dir)
    ask = InterpolateRequest(seeds=parse_seeds(a.seeds) if a.seeds else [],
                             images=[p for p in a.images.split(",") if p.strip()] if a.images else [],
                             frames=a.frames, labels=a.labels)
    ready = ask.check(run)
    use_engine(run.model, a.engine)
    if ask.images:
        a_img, b_img = (model_sized(read_image(p, run.model.cfg.channels), p, run) for p in ask.images)
        images = interpolate_images(run.model, a_img, b_img, a.frames, ready.labels)
    else:
        images = interpolate(run.model, ask.seeds[0], ask.seeds[1], a.frames, ready.labels)
    save_png(grid(images, nrow=a.frames), a.out)
    print(f"wrote a {a.frames}-frame strip to {a.out}")
    return 0


def model_sized(image: torch.Tensor, path: str, run) -> torch.Tensor:
    """An image file read for a family that encodes it: it must have the model's size."""
    size = run.model.cfg.image_size
    if image.shape[-2:] != (size, size):
        raise ConfigError(f"{path}: image is {image.shape[-1]}x{image.shape[-2]}, the model's size is {size}x{size}")
    return image


def _source(a, run, text: str | None, what: str) -> list:
    """Seeds ('3' or '3,9') or image files ('a.png' or 'a.png,b.png') as vary/breed sources."""
    if a.image_files:
        paths = [p for p in a.image_files.split(",") if p.strip()]
        return [model_sized(read_image(p, run.model.cfg.channels), p, run) for p in paths]
    if text is None:
        raise ConfigError(f"give {what} or --image(s)")
    return parse_seeds(text)


def cmd_vary(a) -> int:
    run = load_run(a.run_dir)
    use_engine(run.model, a.engine)
    breeding = a.command == "breed"
    sources = _source(a, run, a.parents if breeding else (None if a.seed is None else str(a.seed)),
                      "--parents A,B" if breeding else "--seed S")
    want = 2 if breeding else 1
    if len(sources) != want:
        raise ConfigError(f"{'breed takes two parents' if breeding else 'vary takes one source'}, got {len(sources)}")
    seeds = parse_seeds(a.seeds)
    files = a.image_files or None
    ask = VaryRequest(seeds, labels=a.labels, prompt=a.prompt, negative_prompt=a.negative_prompt, options=given_options(a),
                      sources=[] if files else sources, image=files, strength=a.strength, mix=a.mix if breeding else 0.5)
    ready = ask.check(run)
    images = breed(run.model, sources, seeds, strength=a.strength, mix=ask.mix, labels=ready.labels, prompt=a.prompt,
                   negative_prompt=a.negative_prompt, batch_size=a.batch_size, **ready.options)
    paths = save_images(images, a.out, seeds)
    if a.grid:
        save_png(grid(images), a.grid)
    print(f"wrote {len(paths)} images to {a.out}" + (f" and a grid to {a.grid}" if a.grid else ""))
    return 0


def _extend(a, mask: str | None) -> int:
    run = load_run(a.run_dir)
    sides = [s.strip() for s in a.sides.split(",") if s.strip()] if mask is None else []
    ask = InpaintRequest([a.seed], labels=a.labels, options=given_options(a), image=a.image, mask=mask,
                         pad=a.pad if mask is None else 0, sides=sides, resample=a.resample)
    ready = ask.check(run)
    use_engine(run.model, a.engine)
    image = read_image(a.image, run.model.cfg.channels)
    image, holes = (image, read_mask(mask, image.shape[-2], image.shape[-1])) if mask else outpaint_canvas(image, a.pad, sides)
    out = extend_image(run.model, image, holes, a.seed, ready.labels, **ready.options)
    save_png(to_pil(to_uint8(out)[0]), a.out)
    print(f"wrote {a.out} ({out.shape[-1]}x{out.shape[-2]})")
    return 0


def cmd_inpaint(a) -> int:
    return _extend(a, a.mask)


def cmd_outpaint(a) -> int:
    return _extend(a, None)


def cmd_translate(a) -> int:
    run = load_run(a.run_dir)
    TranslateRequest(a.input, a.direction).check(run)
    use_engine(run.model, a.engine)
    cfg = run.model.cfg
    names, images, skipped, converted = read_images(a.input, cfg.image_size, cfg.channels)
    for f, reason in skipped:
        print(f"skipped {f}: {reason}", file=sys.stderr)
    if converted:
        print(f"note: {len(converted)} image(s) converted to {cfg.channels} channel(s), e.g. {converted[0]}", file=sys.stderr)
    translated, reconstructed = run.model.cycle(images, a.direction)
    save_named(translated, a.out, names)
    if a.grid:
        k = min(len(names), a.grid_images)
        save_png(grid(torch.cat([images[:k], translated[:k].cpu(), reconstructed[:k].cpu()]), nrow=k,
                      scale=2 if cfg.image_size < 48 else 1), a.grid)
    src, dst = (cfg.domain_a, cfg.domain_b) if a.direction == "a2b" else (cfg.domain_b, cfg.domain_a)
    print(f"translated {len(names)} image(s) {src} -> {dst} into {a.out}"
          + (f"; grid (input / translated / reconstructed) in {a.grid}" if a.grid else ""))
    return 0
