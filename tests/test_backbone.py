"""Slimmable ResNet-FPN: channels at each width and the ImageNet checkpoint converter."""
import pytest
import torch
from detectron2.layers import ShapeSpec

from msad.checkpoint.slimmable import load_slimmable_resnet
from msad.modeling.backbone import BLOCKS_PER_STAGE, build_slimmable_resnet, resnet_channels

WIDTHS = [0.25, 0.5, 0.75, 1.0]


def _resnet(cfg, width, norm="BN", depth=50):
    cfg.MODEL.SLIMMABLE.WIDTH = width
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.DEPTH = depth
    return build_slimmable_resnet(cfg, ShapeSpec(channels=3))


@pytest.mark.parametrize("width", WIDTHS)
def test_resnet_channels_follow_the_slimmable_layout(cfg, width):
    resnet = _resnet(cfg, width)
    assert resnet.stem.conv1.weight.shape == (int(64 * width), 3, 7, 7)
    for i, name in enumerate(["res2", "res3", "res4", "res5"]):
        stage = getattr(resnet, name)
        assert len(stage) == BLOCKS_PER_STAGE[50][i]
        first = stage[0]
        assert first.conv1.weight.shape[0] == int(64 * width) * 2**i  # bottleneck width
        assert first.conv3.weight.shape[0] == int(256 * width) * 2**i
        # Stride sits in the 3x3 conv, as in the slimmable network.
        assert first.conv1.stride == (1, 1) and first.conv2.stride == ((1, 1) if i == 0 else (2, 2))


def _slimmable_checkpoint(blocks, width_list=WIDTHS, seed=0):
    """A checkpoint in the public file's layout: full-width convs, one BN per width."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    full_stem, full_out, full_mid = resnet_channels(1.0)

    def bns(prefix, channels_at):
        for i, w in enumerate(width_list):
            c = channels_at(w)
            for f in ("weight", "bias", "running_mean"):
                sd[f"module.{prefix}.bn.{i}.{f}"] = torch.randn(c, generator=g)
            sd[f"module.{prefix}.bn.{i}.running_var"] = torch.rand(c, generator=g) + 0.5
            sd[f"module.{prefix}.bn.{i}.num_batches_tracked"] = torch.tensor(7)

    sd["module.features.0.0.weight"] = torch.randn(full_stem, 3, 7, 7, generator=g)
    bns("features.0.1", lambda w: resnet_channels(w)[0])
    k, in_full, in_at = 1, full_stem, lambda w: resnet_channels(w)[0]
    for s, n in enumerate(blocks):
        for b in range(n):
            mid_at = lambda w, s=s: resnet_channels(w)[2][s]  # noqa: E731
            out_at = lambda w, s=s: resnet_channels(w)[1][s]  # noqa: E731
            shapes = [(full_mid[s], in_full if b == 0 else full_out[s], 1),
                      (full_mid[s], full_mid[s], 3), (full_out[s], full_mid[s], 1)]
            for j, (o, i, ks) in enumerate(shapes):
                sd[f"module.features.{k}.body.{3 * j}.weight"] = torch.randn(o, i, ks, ks,
                                                                             generator=g)
                bns(f"features.{k}.body.{3 * j + 1}", out_at if j == 2 else mid_at)
            if b == 0:
                sd[f"module.features.{k}.shortcut.0.weight"] = torch.randn(
                    full_out[s], in_full, 1, 1, generator=g)
                bns(f"features.{k}.shortcut.1", out_at)
            k += 1
        in_full = full_out[s]
    sd["module.classifier.0.weight"] = torch.randn(1000, full_out[-1], generator=g)
    return {"model": sd}


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_converter_gives_width_half_its_slices_and_bn_index(cfg, tmp_path, norm):
    ckpt = _slimmable_checkpoint(BLOCKS_PER_STAGE[50])
    path = tmp_path / "s_resnet50.pt"
    torch.save(ckpt, path)
    cfg.MODEL.SLIMMABLE.PRETRAINED = str(path)
    resnet = _resnet(cfg, 0.5, norm)
    sd, src = resnet.state_dict(), ckpt["model"]
    assert torch.equal(sd["stem.conv1.weight"], src["module.features.0.0.weight"][:32, :3])
    assert torch.equal(sd["stem.conv1.norm.running_var"],
                       src["module.features.0.1.bn.1.running_var"])
    # res4 block 2 is features 8 + 2 = 10; its 3x3 conv is body.3 and its BN body.4.bn.1.
    assert torch.equal(sd["res4.2.conv2.weight"], src["module.features.10.body.3.weight"][:128, :128])
    assert torch.equal(sd["res4.2.conv2.norm.weight"], src["module.features.10.body.4.bn.1.weight"])
    assert torch.equal(sd["res5.0.shortcut.weight"],
                       src["module.features.14.shortcut.0.weight"][:1024, :512])
    assert torch.equal(sd["res5.0.shortcut.norm.bias"],
                       src["module.features.14.shortcut.1.bn.1.bias"])


def test_converter_handles_resnet101_block_numbering(cfg, tmp_path):
    ckpt = _slimmable_checkpoint(BLOCKS_PER_STAGE[101])
    resnet = _resnet(cfg, 0.25, depth=101)
    load_slimmable_resnet(resnet, _save(ckpt, tmp_path), 0.25, WIDTHS)
    # res5 starts at feature 1 + 3 + 4 + 23 = 31.
    assert torch.equal(resnet.res5[0].conv1.weight,
                       ckpt["model"]["module.features.31.body.0.weight"][:128, :256])


def _save(ckpt, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    return str(path)


def test_converter_names_a_missing_key(cfg, tmp_path):
    ckpt = _slimmable_checkpoint(BLOCKS_PER_STAGE[50])
    del ckpt["model"]["module.features.5.body.3.weight"]
    resnet = _resnet(cfg, 0.25)
    with pytest.raises(KeyError, match=r"module\.features\.5\.body\.3\.weight.*res3\.1\.conv2"):
        load_slimmable_resnet(resnet, _save(ckpt, tmp_path), 0.25, WIDTHS)


def test_converter_names_a_misshaped_key(cfg, tmp_path):
    ckpt = _slimmable_checkpoint(BLOCKS_PER_STAGE[50])
    ckpt["model"]["module.features.2.body.4.bn.0.weight"] = torch.ones(5)
    resnet = _resnet(cfg, 0.25)
    with pytest.raises(ValueError, match=r"features\.2\.body\.4\.bn\.0\.weight.*\(5,\).*\(16,\)"):
        load_slimmable_resnet(resnet, _save(ckpt, tmp_path), 0.25, WIDTHS)


def test_unknown_width_and_depth_are_refused(cfg):
    with pytest.raises(ValueError, match="WIDTH=0.3"):
        _resnet(cfg, 0.3)
    with pytest.raises(ValueError, match="DEPTH=34"):
        _resnet(cfg, 0.25, depth=34)
