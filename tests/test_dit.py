"""The DiT backbone (nets/dit.py) and the backbone switch (models/backbone.py): adaLN-Zero starts every
block at the identity, patches go back where they came from, the conditioning reaches the output, and
ddpm / flow configs pick the network they name."""

from __future__ import annotations

import typing

import pytest
import torch

import imagegen
from imagegen.errors import ConfigError
from imagegen.models.backbone import BackboneConfig
from imagegen.nets.dit import SIZES, DiT, patchify, sincos_2d, unpatchify
from imagegen.nets.unet import UNet


def test_every_block_starts_as_the_identity_and_the_network_at_zero():
    torch.manual_seed(0)
    net = DiT(3, "xs", patch=2, num_classes=4)
    tokens, c = torch.randn(3, 64, 128), torch.randn(3, 128)
    for block in net.blocks:
        assert torch.equal(block(tokens, c), tokens)
    out = net(torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999]), torch.tensor([0, 3, 4]))
    assert out.shape == (3, 3, 16, 16) and torch.equal(out, torch.zeros_like(out))
    # ... but not a dead one: the output layer has a gradient at once, and once it has moved, so do the
    # zero-initialised gates of the blocks.
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1])
    (net(x, t, y) - 1).square().mean().backward()
    assert net.out.weight.grad.abs().sum() > 0 and net.blocks[0].ada[-1].weight.grad.abs().sum() == 0
    with torch.no_grad():
        net.out.weight.sub_(net.out.weight.grad)
    net.zero_grad()
    (net(x, t, y) - 1).square().mean().backward()
    assert all(block.ada[-1].weight.grad.abs().sum() > 0 for block in net.blocks)


def _trained_a_little(net: DiT) -> DiT:
    """The network with every zero-initialised map given random weights, so every path carries signal."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net


def test_patches_go_back_where_they_came_from_in_the_embeddings_token_order():
    x = torch.randn(2, 3, 8, 12)
    tokens = patchify(x, 4)                                          # 2 x 6 x 48
    assert tokens.shape == (2, 6, 48) and torch.equal(unpatchify(tokens, 4, 2, 3), x)
    # token 4 is the patch at grid row 1, column 1, in (row, column, channel) order
    assert torch.equal(tokens[:, 4], x[:, :, 4:8, 4:8].permute(0, 2, 3, 1).reshape(2, 48))
    # the convolutional patch embedding numbers its tokens the same way (row-major over the grid)
    net = DiT(3, "xxs", patch=4)
    w = net.embed.weight.permute(0, 2, 3, 1).reshape(net.dim, -1)   # D x (row, column, channel)
    with torch.no_grad():
        assert torch.allclose(net.embed(x).flatten(2).transpose(1, 2), tokens @ w.T + net.embed.bias, atol=1e-5)


def test_the_position_code_tells_every_patch_apart_and_has_the_documented_halves():
    pos = sincos_2d(4, 6, 32)
    assert pos.shape == (24, 32)
    assert len({tuple(row.tolist()) for row in pos}) == 24
    # the first half depends on the row only, the second on the column only
    grid = pos.view(4, 6, 32)
    assert torch.allclose(grid[:, :1, :16].expand(-1, 6, -1), grid[:, :, :16])
    assert torch.allclose(grid[:1, :, 16:].expand(4, -1, -1), grid[:, :, 16:])
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(2, 2, 30)


def test_time_and_label_reach_the_output_and_images_do_not_mix_in_a_batch():
    net = _trained_a_little(DiT(1, "xxs", patch=2, num_classes=3)).eval()
    x = torch.randn(4, 1, 8, 8)
    t, y = torch.tensor([10, 10, 900, 10]), torch.tensor([0, 1, 0, 3])
    with torch.no_grad():
        out = net(x, t, y)
        assert not torch.allclose(out[0], net(x[:1], t[2:3], y[:1])[0], atol=1e-4)     # time matters
        assert not torch.allclose(out[0], net(x[:1], t[:1], y[1:2])[0], atol=1e-4)     # label matters
        # each image's output depends on that image alone (attention is within an image)
        assert torch.allclose(out[1:2], net(x[1:2], t[1:2], y[1:2]), atol=1e-5)
        # a larger canvas runs (outpainting), with the position code of its own grid
        assert net(torch.randn(1, 1, 12, 16), t[:1], y[:1]).shape == (1, 1, 12, 16)
    with pytest.raises(ValueError, match="multiple of the patch size 2"):
        net(torch.randn(1, 1, 9, 8), t[:1], y[:1])


def test_sizes_grow_and_the_largest_is_the_papers_dit_s():
    counts = [sum(p.numel() for p in DiT(3, s, patch=2).parameters()) for s in ("xxs", "xs", "s", "m", "l")]
    assert counts == sorted(counts)
    assert (SIZES["l"].depth, SIZES["l"].dim, SIZES["l"].heads) == (12, 384, 6)     # Peebles & Xie, DiT-S
    assert set(typing.get_args(typing.get_type_hints(BackboneConfig)["dit_size"])) == set(SIZES)


@pytest.mark.parametrize("family", ["ddpm", "flow"])
def test_the_config_picks_the_backbone_and_checks_its_sizes(family):
    assert isinstance(imagegen.build_model(family, {"image_size": 16}).net, UNet)     # the default
    dit = imagegen.build_model(family, {"image_size": 16, "backbone": "dit", "dit_size": "xxs", "patch": 4})
    assert isinstance(dit.net, DiT) and dit.net.patch == 4 and dit.cfg.multiple == 4
    with pytest.raises(ConfigError, match="not a multiple of model.patch 3"):
        imagegen.resolve_config({"family": family, "model": {"backbone": "dit", "patch": 3}})
    with pytest.raises(ConfigError, match="model.patch"):
        imagegen.resolve_config({"family": family, "model": {"backbone": "dit", "patch": 17}})
    by_size = imagegen.build_model(family, {"image_size": 16, "backbone": "dit", "dit_size": "xxs"})   # patch 0
    assert by_size.cfg.patch == 0 and by_size.net.patch == 4
    with pytest.raises(ConfigError, match="dit_size"):
        imagegen.resolve_config({"family": family, "model": {"backbone": "dit", "dit_size": "huge"}})


def test_a_unet_with_patches_folds_pixel_blocks_into_channels_and_back():
    """model.unet_patch = 2: the U-Net runs on 2 x 2 pixel blocks folded into channels (28 px at 14 px),
    starts at zero output like the plain one, keeps images apart in a batch, and sizes are checked
    against the patch times the downsampling."""
    torch.manual_seed(0)
    net = UNet(3, 8, (1, 2), attention=False, num_classes=4, patch=2)
    assert net.inp.out_channels == 2 and net.down[0].conv1.in_channels == 8 and net.head.in_channels == 4
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([5, 500, 900]), torch.tensor([0, 1, 4])
    assert torch.equal(net(x, t, y), torch.zeros_like(x))
    for p in net.parameters():                                 # leave the zero start behind
        p.data.add_(0.05 * torch.randn_like(p))
    out = net(x, t, y)
    assert out.shape == x.shape
    moved = x.clone()
    moved[1] += 1
    again = net(moved, t, y)
    assert torch.equal(again[[0, 2]], out[[0, 2]]) and not torch.equal(again[1], out[1])
    model = imagegen.build_model("flow", {"image_size": 28, "mults": [1, 2], "unet_patch": 2})
    assert model.net.patch == 2 and model.cfg.multiple == 4
    with pytest.raises(ConfigError, match="not a multiple of 8"):
        imagegen.resolve_config({"family": "flow", "model": {"mults": [1, 2, 2], "unet_patch": 2}})
    # a run saved before the field had none: it means 1
    assert imagegen.checkpoint._as_saved_then({"family": "flow", "model": {"mults": [1, 2]}})["model"]["unet_patch"] == 1
