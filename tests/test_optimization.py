"""Weight-decay rules, layer-wise lr decay groups and the scheduler (scale applied once)."""

import math

import pytest
import torch

from simmim_hf import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling
from simmim_hf.optimization import LayerDecayLRScheduler, build_optimizer, build_param_groups, layer_decay_scales


@pytest.fixture(scope="module")
def vit():
    return SimMIMForImageClassification(SimMIMConfig.from_preset(
        "vit-nano-p4-32", num_labels=10, use_relative_position_bias=True, use_absolute_position_embeddings=True,
        use_fc_norm=True))


@pytest.fixture(scope="module")
def swin():
    return SimMIMForImageClassification(SimMIMConfig.from_preset("swin-nano-w4-32", num_labels=10))


def scale_of(groups):
    return {name: g["lr_scale"] for g in groups for name in g["param_names"]}


def decay_of(groups):
    return {name: g["weight_decay"] for g in groups for name in g["param_names"]}


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_every_trainable_parameter_in_exactly_one_group(which, request):
    model = request.getfixturevalue(which)
    groups = build_param_groups(model, weight_decay=0.05, layer_decay=0.75)
    names = [n for g in groups for n in g["param_names"]]
    # A classifier never masks, so its mask token is frozen (DDP refuses trainable parameters without gradients).
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["simmim.embeddings.mask_token"]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters() if n not in frozen)
    assert len(names) == len(set(names))
    ids = {id(p) for g in groups for p in g["params"]}
    assert len(ids) == len(names) == len(list(model.parameters())) - 1


def test_vit_layer_scales_hand_computed(vit):
    # depth 2: embeddings = layer 0, blocks 1..2, head = 3; scale = 0.65 ** (3 - layer_id).
    s = scale_of(build_param_groups(vit, 0.05, layer_decay=0.65))
    expected = {
        "simmim.embeddings.cls_token": 0.274625,  # 0.65**3
        "simmim.embeddings.position_embeddings": 0.274625,
        "simmim.embeddings.projection.weight": 0.274625,
        "simmim.encoder.layers.0.attention.qkv.weight": 0.4225,  # 0.65**2
        "simmim.encoder.layers.0.attention.relative_position_bias.relative_position_bias_table": 0.4225,
        "simmim.encoder.layers.1.mlp.fc2.weight": 0.65,
        "simmim.encoder.layers.1.lambda_2": 0.65,
        "simmim.pooler.layernorm.bias": 1.0,  # the official fc_norm trains at the head's lr
        "classifier.weight": 1.0,
    }
    for name, value in expected.items():
        assert s[name] == pytest.approx(value, rel=1e-12), name


def test_swin_layer_scales_hand_computed(swin):
    # depths [2, 2, 2]: 6 blocks, head = layer 7; scale = 0.9 ** (7 - layer_id). Patch merging of stage s
    # belongs to layer sum(depths[:s+1]) as in the official code.
    s = scale_of(build_param_groups(swin, 0.05, layer_decay=0.9))
    expected = {
        "simmim.embeddings.projection.weight": 0.4782969,  # layer 0: 0.9**7
        "simmim.embeddings.norm.weight": 0.4782969,
        "simmim.encoder.stages.0.blocks.0.attention.qkv.weight": 0.531441,  # layer 1: 0.9**6
        "simmim.encoder.stages.0.blocks.1.mlp.fc1.weight": 0.59049,  # layer 2
        "simmim.encoder.stages.0.downsample.reduction.weight": 0.59049,  # layer 2 = sum(depths[:1])
        "simmim.encoder.stages.1.blocks.0.attention.relative_position_bias.relative_position_bias_table": 0.6561,
        "simmim.encoder.stages.1.downsample.norm.weight": 0.729,  # layer 4
        "simmim.encoder.stages.2.blocks.1.mlp.fc2.weight": 0.9,  # layer 6
        "simmim.layernorm.bias": 1.0,
        "classifier.weight": 1.0,
    }
    for name, value in expected.items():
        assert s[name] == pytest.approx(value, rel=1e-12), name
    assert layer_decay_scales(6, 0.9) == pytest.approx([0.9 ** (7 - i) for i in range(8)])


def test_weight_decay_rules(vit, swin):
    d = decay_of(build_param_groups(vit, 0.05, layer_decay=0.65))
    # The official ViT (`VisionTransformer.no_weight_decay` = {pos_embed, cls_token}, no keywords) decays its
    # relative position tables and, in pretraining, its mask token and shared table.
    for name in ("simmim.encoder.layers.0.attention.qkv.weight", "simmim.encoder.layers.0.mlp.fc1.weight",
                 "simmim.embeddings.projection.weight", "classifier.weight",
                 "simmim.encoder.layers.0.attention.relative_position_bias.relative_position_bias_table"):
        assert d[name] == 0.05, name
    for name in ("simmim.embeddings.cls_token", "simmim.embeddings.position_embeddings",
                 "simmim.encoder.layers.0.lambda_1", "simmim.encoder.layers.0.attention.q_bias",
                 "simmim.encoder.layers.0.layernorm_before.weight", "classifier.bias", "simmim.pooler.layernorm.weight"):
        assert d[name] == 0.0, name
    pretraining = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("vit-nano-p4-32"))
    d = decay_of(build_param_groups(pretraining, 0.05))
    assert d["simmim.embeddings.mask_token"] == 0.05
    assert d["simmim.encoder.relative_position_bias.relative_position_bias_table"] == 0.05
    # Swin (`no_weight_decay_keywords` = relative_position_bias_table; SwinTransformerForSimMIM adds mask_token).
    d = decay_of(build_param_groups(swin, 0.05))
    assert d["simmim.encoder.stages.0.downsample.reduction.weight"] == 0.05
    assert d["simmim.encoder.stages.0.blocks.0.attention.relative_position_bias.relative_position_bias_table"] == 0.0
    swin_pretraining = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin-nano-w4-32"))
    assert decay_of(build_param_groups(swin_pretraining, 0.05))["simmim.embeddings.mask_token"] == 0.0


def test_frozen_parameters_are_left_out(vit):
    vit.simmim.requires_grad_(False)
    try:
        groups = build_param_groups(vit, 0.05, layer_decay=0.65)
        assert sorted(n for g in groups for n in g["param_names"]) == ["classifier.bias", "classifier.weight"]
    finally:
        vit.simmim.requires_grad_(True)


def test_effective_lr_is_base_times_scale_not_squared(vit):
    base_lr, decay = 1e-3, 0.65
    optimizer = build_optimizer(vit, lr=base_lr, weight_decay=0.05, layer_decay=decay)
    scheduler = LayerDecayLRScheduler(optimizer, num_training_steps=100, num_warmup_steps=10, schedule="constant")
    for _ in range(10):  # to the end of the warmup: the schedule is at its peak, the base lr
        optimizer.step()
        scheduler.step()
    seen = set()
    for group in optimizer.param_groups:
        scale = decay ** (3 - group["layer_id"])
        assert group["lr"] == pytest.approx(base_lr * scale, rel=1e-12)
        if scale != 1.0:
            assert group["lr"] != pytest.approx(base_lr * scale**2)
        seen.add(group["layer_id"])
    assert seen == {0, 1, 2, 3}
    # The official code's groups: lr pre-set to base * scale *and* an lr_scale key. Still applied once here.
    groups = build_param_groups(vit, 0.05, layer_decay=decay)
    for g in groups:
        g["lr"] = base_lr * g["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=base_lr)
    scheduler = LayerDecayLRScheduler(optimizer, num_training_steps=10, schedule="constant")
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([base_lr * g["lr_scale"] for g in groups])


def test_schedule_values_hand_computed():
    """timm's CosineLRScheduler as the official code sets it up: the cosine spans all steps (no warmup prefix),
    and the warmup start and the floor are absolute for every group (not multiplied by lr_scale)."""
    param = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([{"params": [param], "lr_scale": 0.5}], lr=1.0)
    scheduler = LayerDecayLRScheduler(optimizer, num_training_steps=10, num_warmup_steps=2, warmup_lr=0.02, min_lr=0.1)
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # peak 0.5 (= 1.0 x lr_scale); warmup 0.02 -> 0.5 over 2 steps; then 0.1 + 0.2 (1 + cos(pi t / 10)), t = 2..10.
    expected = [0.02, 0.26] + [0.1 + 0.5 * (0.5 - 0.1) * (1 + math.cos(math.pi * t / 10)) for t in range(2, 11)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[-1] == pytest.approx(0.1)  # the floor is min_lr itself, not min_lr x 0.5
    state = scheduler.state_dict()  # resume: a fresh scheduler restored from the state continues the curve
    optimizer2 = torch.optim.AdamW([{"params": [param], "lr_scale": 0.5}], lr=1.0)
    scheduler2 = LayerDecayLRScheduler(optimizer2, num_training_steps=10, num_warmup_steps=2, min_lr=0.1)
    scheduler2.load_state_dict(state)
    assert scheduler2.lr_at(scheduler2.last_epoch) == scheduler.lr_at(scheduler.last_epoch)

    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = LayerDecayLRScheduler(optimizer, 10, 1, schedule="multistep", milestones=[4, 7], gamma=0.1)
    assert [scheduler.lr_at(t) for t in (0, 1, 3, 4, 6, 7, 9)] == pytest.approx([0, 1, 1, 0.1, 0.1, 0.01, 0.01])
    scheduler = LayerDecayLRScheduler(optimizer, 10, 2, schedule="linear", min_lr=0.2)
    assert [scheduler.lr_at(t, 0.5) for t in (1, 2, 6, 10)] == pytest.approx([0.25, 0.5, 0.35, 0.2])


def test_swinv2_starts_its_cosine_after_the_warmup_as_the_official_swinv2_code(tmp_path):
    """microsoft/Swin-Transformer's SimMIM scripts use timm's CosineLRScheduler with `warmup_prefix=True` and
    `t_initial = steps - warmup`: the cosine starts at the peak when the warmup ends. Default for SwinV2 only."""
    from types import SimpleNamespace

    from simmim_hf.optimization import LearningRatePlan, create_optimizer_and_scheduler

    param = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = LayerDecayLRScheduler(optimizer, 10, 2, warmup_lr=0.0, min_lr=0.1, warmup_prefix=True)
    expected = [0.0, 0.5] + [0.1 + 0.45 * (1 + math.cos(math.pi * (t - 2) / 8)) for t in range(2, 11)]
    assert [scheduler.lr_at(t) for t in range(11)] == pytest.approx(expected, abs=1e-12)
    assert scheduler.lr_at(2) == 1.0 and scheduler.lr_at(6) == pytest.approx(0.55)  # the peak, then halfway
    args = SimpleNamespace(weight_decay=0.05, lr_warmup_prefix=None, lr_scheduler_type="cosine", adam_beta1=0.9,
                           adam_beta2=0.999, adam_epsilon=1e-8, lr_gamma=0.1)
    plan = LearningRatePlan(total_batch_size=8, peak_lr=1e-3, warmup_lr=0.0, min_lr=0.0, max_train_steps=10,
                            warmup_steps=2, steps_per_epoch=5, milestones=(), lr_given=True)
    prefixes = {}
    for preset in ("swinv2-nano-w4-32", "swin-nano-w4-32", "vit-nano-p4-32"):
        model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset))
        prefixes[preset] = create_optimizer_and_scheduler(model, args, plan)[1].warmup_prefix
    assert prefixes == {"swinv2-nano-w4-32": True, "swin-nano-w4-32": False, "vit-nano-p4-32": False}
    args.lr_warmup_prefix = False  # the flag decides where given
    assert not create_optimizer_and_scheduler(model, args, plan)[1].warmup_prefix
    # A scheduler state saved before the option existed ran without it.
    state = scheduler.state_dict()
    del state["warmup_prefix"]
    scheduler.load_state_dict(state)
    assert scheduler.warmup_prefix is False


def test_errors_name_the_argument(vit):
    with pytest.raises(ValueError, match="layer_decay"):
        build_param_groups(vit, 0.05, layer_decay=1.5)
    with pytest.raises(ValueError, match="get_layer_id_for_lr_decay"):
        build_param_groups(torch.nn.Linear(2, 2), 0.05, layer_decay=0.5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="num_warmup_steps"):
        LayerDecayLRScheduler(optimizer, num_training_steps=5, num_warmup_steps=6)
    with pytest.raises(ValueError, match="schedule"):
        LayerDecayLRScheduler(optimizer, num_training_steps=5, schedule="poly")


def test_shared_relative_position_bias_trains_at_full_lr_like_the_official_code():
    # Official `get_vit_layer`: rel_pos_bias -> num_layers - 1, the head's layer (scale 1); patch/tokens -> 0.
    model = SimMIMForImageClassification(SimMIMConfig.from_preset("vit-nano-p4-32", num_labels=3))
    depth = model.config.num_hidden_layers
    scales = scale_of(build_param_groups(model, weight_decay=0.05, layer_decay=0.5))
    assert scales["simmim.encoder.relative_position_bias.relative_position_bias_table"] == 1.0
    assert scales["simmim.embeddings.cls_token"] == 0.5 ** (depth + 1)
    assert scales["simmim.encoder.layers.1.mlp.fc1.weight"] == 0.5 ** (depth - 1)
