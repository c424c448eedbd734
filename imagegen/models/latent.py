"""Latent mode: a flow or ddpm model (either backbone) that learns the latents of an `ae` run instead of
pixels, `model.autoencoder = RUN` (models/backbone.py uses what is here).

After Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022): the
images are encoded once (the posterior means), the latents shifted and scaled to zero mean and unit
variance over the training data (their scale factor; SD3 adds the shift), and the backbone trained on them;
sampling decodes. At 64 px and factor 4 the backbone sees 16 x 16 x 4 instead of 64 x 64 x 3: 16 times
fewer positions.

- The encoded training data is cached under $IMAGEGEN_CACHE/latents/ by the SHA-256 of the autoencoder's
  weights and of the images, so a second run on the same data and autoencoder encodes nothing, and a
  change to either encodes afresh.
- The run's config names the autoencoder's folder and the SHA-256 of its ema.safetensors. Training and
  resuming open that folder and refuse it when it is missing or its weights differ; the run then carries
  a copy of the encoder and decoder in its own weights, so sampling, serving and evaluation need the run
  folder alone.

Shapes: images N x C x S x S in [-1, 1]; latents N x c x S/f x S/f (c = latent_channels, f = latent_factor).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..config import cache_path, from_dict
from ..errors import CheckpointError, ConfigError
from ..files import verify_manifest, write_bytes_atomic
from ..nets.autoencoder import Decoder, Encoder
from .ae import AE

ENCODE_BATCH = 256


def open_autoencoder(path: str | Path) -> tuple[AE, str]:
    """(the ae run's model with its EMA weights, the SHA-256 of its ema.safetensors), the folder checked
    against its manifest."""
    folder = Path(path)
    what = f"model.autoencoder {str(path)!r}"
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what}: not a run folder (no config.json); train one with "
                          f"`imagegen train --model ae --data ...`") from None
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"{what}: config.json unreadable ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("family") != AE.name or not isinstance(cfg.get("model"), dict):
        family = cfg.get("family") if isinstance(cfg, dict) else None
        raise ConfigError(f"{what}: a {family!r} run, not an autoencoder (model 'ae')")
    files = verify_manifest(folder)
    if "ema.safetensors" not in files:
        raise CheckpointError(f"{folder}: its manifest lists no ema.safetensors")
    try:
        ae = AE(from_dict(AE.Config, cfg["model"], "model"))
        ae.load_state_dict(st_load((folder / "ema.safetensors").read_bytes()))
    except (SafetensorError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'ema.safetensors'}: does not fit its config.json ({e})") from None
    return ae.eval().requires_grad_(False), files["ema.safetensors"]


def images_sha256(dataset) -> str:
    images = dataset.images.contiguous()
    h = hashlib.sha256(repr(tuple(images.shape)).encode())
    h.update(images.numpy().data)
    return h.hexdigest()


def cache_file(ae_sha256: str, data_sha256: str) -> Path:
    """Where the latents of one set of images under one autoencoder are cached."""
    key = hashlib.sha256(f"{ae_sha256}:{data_sha256}".encode()).hexdigest()[:32]
    return cache_path("latents", f"{key}.safetensors")


def cached_latents(ae: AE, ae_sha256: str, dataset, log=print) -> torch.Tensor:
    """The posterior means of every image of `dataset` (float32 N x c x S/f x S/f, unscaled), read from the
    cache when the same autoencoder has encoded the same images before, else encoded and cached."""
    data_sha = images_sha256(dataset)
    path = cache_file(ae_sha256, data_sha)
    shape = (len(dataset), *ae.latent_shape)
    if path.is_file():
        try:
            z = st_load(path.read_bytes())["latents"]
            if tuple(z.shape) == shape and z.dtype == torch.float32 and bool(torch.isfinite(z).all()):
                return z
        except (SafetensorError, KeyError, OSError, ValueError):
            pass
        if log:
            log(f"note: {path} is damaged; encoding again")
    if log:
        log(f"encoding {len(dataset)} images with the autoencoder (once; cached in {path.parent})")
    rows = [ae.to_latent(dataset.batch(torch.arange(i, min(i + ENCODE_BATCH, len(dataset))))["image"]).cpu()
            for i in range(0, len(dataset), ENCODE_BATCH)]
    z = torch.cat(rows).float().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, st_save({"latents": z}, metadata={"autoencoder_sha256": ae_sha256, "images_sha256": data_sha}))
    return z


def fit(cfg, dataset, log=print):
    """A backbone config with model.autoencoder completed from that run and the data: its SHA-256 (refused
    when the config already names another: the autoencoder changed under a run), its latent's shape, and
    the shift and scale of the data's latents."""
    ae, sha = open_autoencoder(cfg.autoencoder)
    if cfg.autoencoder_sha256 and cfg.autoencoder_sha256 != sha:
        raise ConfigError(f"model.autoencoder {cfg.autoencoder!r} changed since this run began: its ema.safetensors "
                          f"has SHA-256 {sha[:12]}..., the run was trained on {cfg.autoencoder_sha256[:12]}...")
    if (ae.cfg.image_size, ae.cfg.channels) != (dataset.size, dataset.channels):
        raise ConfigError(f"model.autoencoder {cfg.autoencoder!r} takes {ae.cfg.channels} x {ae.cfg.image_size} px "
                          f"images; {dataset.name!r} has {dataset.channels} x {dataset.size} px (set --size)")
    z = cached_latents(ae, sha, dataset, log)
    return replace(cfg, autoencoder_sha256=sha, latent_factor=ae.cfg.factor, latent_channels=ae.cfg.latent_channels,
                   autoencoder_width=ae.cfg.width, latent_shift=float(z.mean()), latent_scale=float(1 / z.std()))


class LatentSpace(nn.Module):
    """The autoencoder's frozen encoder and decoder inside a latent model, and the affine map between its
    latents and the backbone's unit-variance ones: z = (mean - shift) * scale."""

    def __init__(self, cfg) -> None:
        super().__init__()
        args = (cfg.channels, cfg.latent_channels, cfg.latent_factor, cfg.autoencoder_width)
        self.encoder, self.decoder = Encoder(*args), Decoder(*args)
        self.shift, self.scale, self.factor = cfg.latent_shift, cfg.latent_scale, cfg.latent_factor
        self.requires_grad_(False)

    def adopt(self, ae: AE) -> None:
        """The weights of the autoencoder run (a new run's first step)."""
        self.encoder.load_state_dict(ae.encoder.state_dict())
        self.decoder.load_state_dict(ae.decoder.state_dict())

    def scaled(self, mean: torch.Tensor) -> torch.Tensor:
        return (mean - self.shift) * self.scale

    def encode(self, x: torch.Tensor, run) -> torch.Tensor:
        """Images N x C x H x W -> unit-variance latents N x c x H/f x W/f (run: Family.run, fixed batches)."""
        return self.scaled(run(lambda x_: self.encoder(x_)[0], x))

    def decode(self, z: torch.Tensor, run) -> torch.Tensor:
        """Unit-variance latents -> images in [-1, 1]."""
        return run(lambda z_: self.decoder(z_ / self.scale + self.shift), z).clamp(-1, 1)
