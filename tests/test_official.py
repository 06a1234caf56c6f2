"""Official MSAD checkpoints: made here in the official layout (every key name and shape of
dvlab-research/MSAD's TFCOS and SFCOS, random values), converted, checked module by module against
what the official layers compute from the official tensors, and evaluated with the trainers."""
import json
import os

import cv2
import pytest
import torch
import torch.nn.functional as F

import msad.checkpoint.official as official
from helpers import REPO, final_ap, quickstart_cfg, run_tool, tool_here, train_net
from msad.checkpoint.official import convert
from msad.config import OFFICIAL_WIDTH_LIST
from msad.config import load_config

# ResNet-50 at width 1: (bottleneck channels, output channels, blocks) of res2..res5.
STAGES = ((64, 256, 3), (128, 512, 4), (256, 1024, 6), (512, 2048, 3))
HEAD_CONVS = (0, 3, 6, 9)  # tower positions of the convolutions; GroupNorm follows each


def batchnorm_sets(prefix, channels, g):
    """A SwitchableBatchNorm2d's sets bn.0..bn.3, one per width of OFFICIAL_WIDTH_LIST."""
    out = {}
    for i, w in enumerate(OFFICIAL_WIDTH_LIST):
        c = int(channels * w)
        out.update({f"{prefix}.bn.{i}.weight": 1 + 0.1 * torch.randn(c, generator=g),
                    f"{prefix}.bn.{i}.bias": 0.1 * torch.randn(c, generator=g),
                    f"{prefix}.bn.{i}.running_mean": 0.1 * torch.randn(c, generator=g),
                    f"{prefix}.bn.{i}.running_var": 0.5 + torch.rand(c, generator=g),
                    f"{prefix}.bn.{i}.num_batches_tracked": torch.tensor(90000)})
    return out


def conv(g, *shape):
    fan_in = shape[1] * shape[2] * shape[3]
    return torch.randn(*shape, generator=g) / fan_in ** 0.5


def official_backbone(prefix, width, g):
    """`prefix`backbone.*: the slimmable ResNet-50 (full-width convolutions) and the FPN of
    `width` with P6 from C5 and P7."""
    sd = {f"{prefix}backbone.bottom_up.features.0.0.weight": conv(g, 64, 3, 7, 7),
          **batchnorm_sets(f"{prefix}backbone.bottom_up.features.0.1", 64, g)}
    k, inp = 1, 64
    for mid, out, blocks in STAGES:
        for b in range(blocks):
            block = f"{prefix}backbone.bottom_up.features.{k}"
            for position, (c_out, c_in, size) in zip((0, 3, 6), ((mid, inp, 1), (mid, mid, 3),
                                                                 (out, mid, 1))):
                sd[f"{block}.body.{position}.weight"] = conv(g, c_out, c_in, size, size)
                sd.update(batchnorm_sets(f"{block}.body.{position + 1}", c_out, g))
            if b == 0:
                sd[f"{block}.shortcut.0.weight"] = conv(g, out, inp, 1, 1)
                sd.update(batchnorm_sets(f"{block}.shortcut.1", out, g))
            k, inp = k + 1, out
    for level, (_, channels, _) in zip((2, 3, 4, 5), STAGES):
        sd[f"{prefix}backbone.fpn_lateral{level}.weight"] = conv(g, 256, int(channels * width),
                                                                 1, 1)
        sd[f"{prefix}backbone.fpn_output{level}.weight"] = conv(g, 256, 256, 3, 3)
    sd[f"{prefix}backbone.top_block.p6.weight"] = conv(g, 256, int(2048 * width), 3, 3)
    sd[f"{prefix}backbone.top_block.p7.weight"] = conv(g, 256, 256, 3, 3)
    for key in [k for k in sd if k.startswith(f"{prefix}backbone.") and ".fpn_" in k
                or ".top_block." in k]:
        sd[key.replace(".weight", ".bias")] = 0.1 * torch.randn(256, generator=g)
    return sd


def official_head(prefix, num_classes, g):
    """`prefix`fcos_head.*: GroupNorm towers, the predictors (bbox_pred and ctrness without
    bias), one Scale per level."""
    sd = {}
    for tower in ("cls_tower", "bbox_tower"):
        for j in HEAD_CONVS:
            sd[f"{prefix}fcos_head.{tower}.{j}.weight"] = conv(g, 256, 256, 3, 3)
            sd[f"{prefix}fcos_head.{tower}.{j}.bias"] = 0.1 * torch.randn(256, generator=g)
            sd[f"{prefix}fcos_head.{tower}.{j + 1}.weight"] = 1 + 0.1 * torch.randn(256, generator=g)
            sd[f"{prefix}fcos_head.{tower}.{j + 1}.bias"] = 0.1 * torch.randn(256, generator=g)
    sd[f"{prefix}fcos_head.cls_logits.weight"] = conv(g, num_classes, 256, 3, 3)
    sd[f"{prefix}fcos_head.cls_logits.bias"] = torch.full((num_classes,), -2.0)
    sd[f"{prefix}fcos_head.bbox_pred.weight"] = conv(g, 4, 256, 3, 3)
    sd[f"{prefix}fcos_head.ctrness.weight"] = conv(g, 1, 256, 3, 3)
    for level in range(5):
        sd[f"{prefix}fcos_head.scales.{level}.scale"] = torch.tensor([1.0 + 0.3 * level])
    return sd


def official_checkpoint(role, width, num_classes=5, seed=0):
    """What the official training saved: TFCOS (teacher) or SFCOS (student, beside a copy of
    its teacher), in Detectron2's checkpoint container."""
    g = torch.Generator().manual_seed(seed)
    sd = {**official_backbone("T_", width, g), "SE.fc.0.weight": conv(g, 32, 512, 1, 1)[..., 0, 0],
          "SE.fc.2.weight": conv(g, 2, 32, 1, 1)[..., 0, 0], **official_head("T_", num_classes, g)}
    if role == "student":
        sd.update({**official_backbone("S_", width, g), **official_head("S_", num_classes, g)})
    return {"model": sd, "iteration": 89999}


def our_model(role, width, num_classes=5):
    from detectron2.modeling import build_model

    name = f"SLR{round(width * 100):03d}-50-{role[0].upper()}.yaml"
    cfg = load_config(os.path.join(REPO, "configs", "MSAD", "official", name),
                      ["MODEL.DEVICE", "cpu", "MODEL.FCOS.NUM_CLASSES", num_classes])
    return build_model(cfg).eval()


def converted(role, width, checkpoint=None, file_role=None):
    """Our `role` model at `width` with the conversion of an official checkpoint loaded."""
    checkpoint = checkpoint or official_checkpoint(file_role or role, width)
    model = our_model(role, width)
    model.load_state_dict(convert(checkpoint["model"], role, width, model.state_dict()).state,
                          strict=True)
    return model, checkpoint["model"]


# ---- what the official layers compute, from the official tensors -----------------------------
def official_bn(x, sd, prefix, index):
    return F.batch_norm(x, sd[f"{prefix}.bn.{index}.running_mean"],
                        sd[f"{prefix}.bn.{index}.running_var"], sd[f"{prefix}.bn.{index}.weight"],
                        sd[f"{prefix}.bn.{index}.bias"], False, 0.0, 1e-5)


def official_conv(x, sd, key, out, stride=1, padding=0):
    """SlimmableConv2d: the leading out x in slice of the full-width weight."""
    return F.conv2d(x, sd[key][:out, :x.shape[1]], None, stride, padding)


def official_stem(x, sd, prefix, width):
    index, c = OFFICIAL_WIDTH_LIST.index(width), int(64 * width)
    y = official_conv(x, sd, f"{prefix}backbone.bottom_up.features.0.0.weight", c, 2, 3)
    y = F.relu(official_bn(y, sd, f"{prefix}backbone.bottom_up.features.0.1", index))
    return F.max_pool2d(y, 3, 2, 1)


def official_block(x, sd, prefix, k, mid, out, stride, width):
    """Block k: 1x1 -> 3x3 (the stride) -> 1x1, with a projection shortcut."""
    index, base = OFFICIAL_WIDTH_LIST.index(width), f"{prefix}backbone.bottom_up.features.{k}"
    y = x
    for position, (channels, s, pad) in zip((0, 3, 6), ((mid, 1, 0), (mid, stride, 1),
                                                         (out, 1, 0))):
        y = official_conv(y, sd, f"{base}.body.{position}.weight", int(channels * width), s, pad)
        y = official_bn(y, sd, f"{base}.body.{position + 1}", index)
        if position < 6:
            y = F.relu(y)
    shortcut = official_conv(x, sd, f"{base}.shortcut.0.weight", int(out * width), stride)
    return F.relu(y + official_bn(shortcut, sd, f"{base}.shortcut.1", index))


def official_head_outputs(features, sd, prefix):
    """tower.py's FCOSHead: per level (logits, scale x bbox_pred, ctrness) before any ReLU."""
    head = f"{prefix}fcos_head"
    outputs = []
    for level, x in enumerate(features):
        towers = {}
        for tower in ("cls_tower", "bbox_tower"):
            y = x
            for j in HEAD_CONVS:
                y = F.conv2d(y, sd[f"{head}.{tower}.{j}.weight"], sd[f"{head}.{tower}.{j}.bias"],
                             padding=1)
                y = F.relu(F.group_norm(y, 32, sd[f"{head}.{tower}.{j + 1}.weight"],
                                        sd[f"{head}.{tower}.{j + 1}.bias"]))
            towers[tower] = y
        outputs.append((
            F.conv2d(towers["cls_tower"], sd[f"{head}.cls_logits.weight"],
                     sd[f"{head}.cls_logits.bias"], padding=1),
            F.conv2d(towers["bbox_tower"], sd[f"{head}.bbox_pred.weight"], padding=1)
            * sd[f"{head}.scales.{level}.scale"],
            F.conv2d(towers["bbox_tower"], sd[f"{head}.ctrness.weight"], padding=1)))
    return outputs


def official_fusion(hr, lr, sd):
    """The SE layer all levels share: softmax(fc2(relu(fc1(pool(cat))))), w0 x HR + w1 x LR."""
    w = F.softmax(F.linear(F.relu(F.linear(torch.cat([hr, lr], 1).mean(dim=(2, 3)),
                                           sd["SE.fc.0.weight"])), sd["SE.fc.2.weight"]), dim=1)
    return w[:, :1, None, None] * hr + w[:, 1:, None, None] * lr


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4)


# ---- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", OFFICIAL_WIDTH_LIST)
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_conversion_gives_every_parameter_and_reports_the_rest(role, width):
    checkpoint = official_checkpoint(role, width)
    model = our_model(role, width)
    result = convert(checkpoint["model"], role, width, model.state_dict())
    model.load_state_dict(result.state, strict=True)
    assert set(result.filled) >= {"head.bbox_pred.bias", "head.ctrness.bias"}
    assert all(v == 0 for k in ("head.bbox_pred.bias", "head.ctrness.bias")
               for v in result.state[k].tolist())
    # Every official tensor is mapped, or left out and reported with why.
    dropped = {k for keys in result.dropped.values() for k in keys}
    used = {v.split("[")[0] for v in result.mapped.values() if "<level>" not in v}
    used |= {k for k in checkpoint["model"] if ".scales." in k and k.startswith(
        official.PREFIX[role])}  # stacked into head.scales
    assert used | dropped == set(checkpoint["model"]) and not used & dropped
    other_widths = result.dropped["BatchNorm sets of the other widths"]
    assert len(other_widths) == 53 * 3 * 5
    if role == "student":
        assert "S_backbone.top_block.p7.weight" in result.dropped["levels this model does not read"]
        assert any(k.startswith("T_backbone.") for keys in result.dropped.values() for k in keys)


@pytest.mark.parametrize("role,width", [("teacher", 0.25), ("student", 0.75)])
def test_backbone_outputs_equal_the_official_slices(role, width):
    model, sd = converted(role, width)
    pre = official.PREFIX[role]
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    bottom_up = model.backbone.bottom_up
    with torch.no_grad():
        stem = bottom_up.stem(x)
        assert close(stem, official_stem(x, sd, pre, width))
        res2 = bottom_up.res2[0](stem)
        assert close(res2, official_block(stem, sd, pre, 1, 64, 256, 1, width))
        res3 = bottom_up.res3[0](bottom_up.res2[2](bottom_up.res2[1](res2)))
        official_res3 = official_block(bottom_up.res2[2](bottom_up.res2[1](res2)), sd, pre, 4,
                                       128, 512, 2, width)
        assert close(res3, official_res3)
    for key in ("fpn_lateral2.weight", "fpn_output5.bias", "top_block.p6.weight"):
        assert torch.equal(model.state_dict()[f"backbone.{key}"], sd[f"{pre}backbone.{key}"])


def test_a_wrong_batchnorm_set_is_refused(monkeypatch):
    # Width 0.5 read as if it were the first width of the list: bn.0 has a quarter's channels.
    monkeypatch.setattr(official, "OFFICIAL_WIDTH_LIST", (0.5, 0.25, 0.75, 1.0))
    checkpoint = official_checkpoint("teacher", 0.5)
    with pytest.raises(ValueError, match=r"bn\.0\.weight' has shape \(16,\)"):
        convert(checkpoint["model"], "teacher", 0.5, our_model("teacher", 0.5).state_dict())


def head_matches(model, sd, prefix):
    g = torch.Generator().manual_seed(2)
    features = [torch.randn(1, 256, s, s + 2, generator=g) for s in (16, 8, 4, 2, 1)]
    with torch.no_grad():
        ours = model.head(features)
    return all(close(mine, theirs) for level, outputs in enumerate(official_head_outputs(
        features, sd, prefix)) for mine, theirs in zip((o[level] for o in ours), outputs))


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_head_outputs_equal_the_official_head(role):
    model, sd = converted(role, 0.25)
    assert head_matches(model, sd, official.PREFIX[role])


def test_a_wrong_head_mapping_is_caught(monkeypatch):
    # The two towers have the same shapes: only their outputs tell a swap.
    monkeypatch.setitem(official.HEAD_MODULES, "cls_tower", "bbox_subnet")
    monkeypatch.setitem(official.HEAD_MODULES, "bbox_tower", "cls_subnet")
    model, sd = converted("teacher", 0.25)
    assert not head_matches(model, sd, "T_")


def fusion_matches(model, sd):
    g = torch.Generator().manual_seed(3)
    hr, lr = torch.randn(2, 256, 6, 5, generator=g), torch.randn(2, 256, 6, 5, generator=g)
    with torch.no_grad():
        return [close(fuse(hr, lr), official_fusion(hr, lr, sd)) for fuse in model.fusion]


def test_fusion_equals_the_official_se_layer_at_every_level(monkeypatch):
    model, sd = converted("teacher", 0.25)
    assert fusion_matches(model, sd) == [True] * 5
    # fc2's rows are the HR and LR weights, in that order: swapped, the shapes still fit.
    swapped = dict(sd, **{"SE.fc.2.weight": sd["SE.fc.2.weight"].flip(0)})
    wrong, _ = converted("teacher", 0.25, {"model": swapped})
    assert fusion_matches(wrong, sd) == [False] * 5


def test_a_student_is_made_of_the_student_s_tensors_and_its_file_s_teacher_can_be_extracted():
    checkpoint = official_checkpoint("student", 0.25)
    sd = checkpoint["model"]
    student, _ = converted("student", 0.25, checkpoint)
    teacher, _ = converted("teacher", 0.25, checkpoint)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert close(student.backbone.bottom_up.stem(x), official_stem(x, sd, "S_", 0.25))
        assert not close(student.backbone.bottom_up.stem(x), official_stem(x, sd, "T_", 0.25))
        assert close(teacher.backbone.bottom_up.stem(x), official_stem(x, sd, "T_", 0.25))
    assert head_matches(student, sd, "S_") and head_matches(teacher, sd, "T_")


def test_files_that_are_not_official_or_of_another_width_are_refused(tmp_path):
    ours = tmp_path / "ours.pth"
    torch.save({"model": our_model("teacher", 0.25).state_dict()}, ours)
    teacher = tmp_path / "official_teacher.pth"
    torch.save(official_checkpoint("teacher", 0.5), teacher)
    for args, message in [
        ((ours, "--role", "teacher", "--width", 0.25), "is not an official MSAD checkpoint"),
        ((teacher, "--role", "teacher", "--width", 0.25),
         "is a width-0.5 model (T_backbone.fpn_lateral2.weight has shape (256, 128, 1, 1))"),
        ((teacher, "--role", "student", "--width", 0.5), "it holds no student"),
        ((tmp_path / "none.pth", "--role", "teacher", "--width", 0.5), "no such file"),
    ]:
        proc = tool_here("convert_official_msad", *args, "-o", tmp_path / "out" / "w.pth")
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_converted_teacher_and_student_evaluate_with_the_trainers(tmp_path):
    """Converted from official-layout files made here (5 classes, width 0.25), both evaluate on
    the bundled val split with train_net_T.py / train_net_S.py --eval-only, detecting what the
    converted model detects when msad.Predictor runs it (every score kept: random weights)."""
    from detectron2.data import DatasetCatalog

    from msad.export.predictor import Predictor

    first = DatasetCatalog.get("msad_synth_val")[0]
    for role, script, convert_with in (("teacher", "train_net_T.py", run_tool),
                                       ("student", "train_net_S.py", tool_here)):
        path = tmp_path / f"official_{role}.pth"
        torch.save(official_checkpoint(role, 0.25), path)
        out = tmp_path / "converted" / role / "model_final.pth"
        args = (path, "--role", role, "--width", 0.25, "-o", out)
        proc = convert_with("convert_official_msad.py" if convert_with is run_tool
                            else "convert_official_msad", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Left out" in proc.stdout and "Wrote" in proc.stdout
        assert (out.parent / "config.yaml").is_file() and (out.parent / "model_info.json").is_file()
        proc = tool_here("convert_official_msad", *args)
        assert proc.returncode != 0 and "exists" in proc.stderr  # nothing overwritten
        config = os.path.join(REPO, "configs", "MSAD", "official", f"SLR025-50-{role[0].upper()}.yaml")
        opts = ["MODEL.FCOS.NUM_CLASSES", 5, "MODEL.DEVICE", "cpu", "MODEL.FCOS.SCORE_THRESH_TEST",
                0.0, "DATASETS.TEST", "('msad_synth_val',)", "INPUT.MIN_SIZE_TEST", 0]
        proc = train_net("--config-file", config, "--eval-only", "MODEL.WEIGHTS", out, *opts,
                         "OUTPUT_DIR", tmp_path / f"eval_{role}", script=script)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(final_ap(proc.stdout + proc.stderr).split(",")) == 6
        with open(tmp_path / f"eval_{role}" / "inference" / "coco_instances_results.json") as f:
            evaluated = sorted((d["score"] for d in json.load(f) if d["image_id"] == first["image_id"]),
                               reverse=True)
        predictor = Predictor(load_config(config, [str(o) for o in opts]), str(out))
        expected = predictor(cv2.imread(first["file_name"])).scores.tolist()
        assert len(evaluated) == len(expected) > 10
        assert evaluated == pytest.approx(sorted(expected, reverse=True), abs=1e-4)


def test_topk_by_product_keeps_the_same_detections_and_scores():
    from detectron2.modeling import build_model

    models = {}
    for ranking in ("score", "product"):
        torch.manual_seed(0)
        models[ranking] = build_model(quickstart_cfg(
            "hr_baseline", "MODEL.FCOS.TOPK_RANKING", ranking)).eval()
        with torch.no_grad():
            models[ranking].head.cls_score.bias.fill_(-1.0)
    x = [{"image": torch.rand(3, 200, 240, generator=torch.Generator().manual_seed(0)) * 255}]
    with torch.no_grad():
        score, product = (models[r](x)[0]["instances"] for r in ("score", "product"))
    assert len(score) > 10 and len(product) == len(score)
    assert torch.equal(product.scores, score.scores)  # the square root is what is reported
    assert torch.equal(product.pred_boxes.tensor, score.pred_boxes.tensor)
    with pytest.raises(ValueError, match="MODEL.FCOS.TOPK_RANKING must be one of"):
        build_model(quickstart_cfg("hr_baseline", "MODEL.FCOS.TOPK_RANKING", "sqrt"))


def test_topk_by_product_keeps_the_larger_product_where_square_roots_tie():
    """Two candidates whose class x centerness differ but whose float32 square roots are equal:
    with one candidate kept per level, "product" keeps the larger wherever it is; "score" sees a
    tie and keeps the same position both times, so it keeps the smaller once."""
    from detectron2.modeling import build_model
    from detectron2.structures import ImageList

    t = torch.linspace(0.0, 0.01, 200001)
    ctr = torch.sigmoid(t)
    tie = next(i for i in range(len(t) - 1) if ctr[i] < ctr[i + 1]
               and torch.sqrt(ctr[i]) == torch.sqrt(ctr[i + 1]))
    kept = {}
    for ranking in ("score", "product"):
        model = build_model(quickstart_cfg("hr_baseline", "MODEL.FCOS.TOPK_RANKING", ranking,
                                           "MODEL.FCOS.TOPK_CANDIDATES_TEST", 1)).eval()
        sizes = [(1, 2)] + [(1, 1)] * 4  # level 0 has the two candidates
        features = [torch.zeros(1, 8, h, w) for h, w in sizes]
        for larger_first in (True, False):
            order = [tie + 1, tie] if larger_first else [tie, tie + 1]
            logits = [torch.full((1, 5, h, w), -30.0) for h, w in sizes]
            logits[0][0, 0] = 30.0  # class 0 certain at both locations of level 0
            ctrness = [torch.zeros(1, 1, h, w) for h, w in sizes]
            ctrness[0][0, 0, 0] = t[order]
            deltas = [torch.ones(1, 4, h, w) for h, w in sizes]
            images = ImageList(torch.zeros(1, 3, 8, 16), [(8, 16)])
            with torch.no_grad():
                result = model.forward_inference(images, features, (logits, deltas, ctrness))[0]
            assert len(result) == 1
            location = int(result.pred_boxes.get_centers()[0, 0] // 8)  # level 0: stride 8
            kept[ranking, larger_first] = order[location]
    assert kept["product", True] == kept["product", False] == tie + 1
    assert {kept["score", True], kept["score", False]} == {tie, tie + 1}
