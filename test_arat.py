"""Tests for arat.py: one property per test, CPU only, offline, on data the tests make themselves."""

import copy
import dataclasses
import functools
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import types
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import arat
import baselines

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# -------------------------------------------------------------------------------------------------------------- helpers

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]  # one class per tint: easy and robust


def write_folder(root, n_train, n_val, size=16, classes=3, seed=0):
    """An image-folder dataset (train/ and val/, one subfolder per class) of noisy tinted squares."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(COLOURS[c], 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("tiny"), n_train=8, n_val=4)


# Every training test pins --amp off: the default precision depends on the CPU (bf16 only where it is native).
FAST = "--batch-size 8 --workers 0 --eval-n 8 --balance-n 8 --attack-steps 2 --eval-steps 3 --log-every 1 --amp off"


def cli(data, out, *flags):
    """Config for a fast in-process run: batch 8, single-process loading, fp32."""
    return arat.parse_args(["--dataset", str(data), "--out", str(out), *FAST.split(), *flags])


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights(path, key="model"):
    return torch.load(path, weights_only=False)[key]


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class TinyNet(nn.Module):
    """A small CNN: two conv-BN-ReLU stages, pooling, a linear head."""

    def __init__(self, classes=3, width=8):
        super().__init__()
        self.layer4 = nn.Sequential(  # named as ResNet-18's last stage: evaluate() taps it as the penultimate features
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.layer4(x).mean((2, 3)))


def linear_model(seed=0):
    """A linear classifier on 3x12x12 images: its loss reacts strongly to small input changes."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 3))
    nn.init.normal_(model[1].weight, std=0.1)
    return model


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return arat.convert_split_bn(TinyNet()).eval()


def tiny_cfg(**kw):
    """A resolved Config for unit tests on TinyNet (its tapped layers are layer4.2 and layer4.5)."""
    kw = {"dataset": "cifar10", "layers": "layer4.2,layer4.5", "attack_steps": 2, "amp": "off", "device": "cpu"} | kw
    return arat.resolve(arat.Config(**kw))


def buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


class Batches:
    """The `batches` interface of arat.Images over tensors in memory (no augmentation)."""

    def __init__(self, x, y):
        self.x, self.y, self.targets = x, y, y.tolist()

    def batches(self, index_batches, seed=None):
        return ((self.x[i], self.y[i]) for i in index_batches)


# ---------------------------------------------------------------------------------------------------------------- Eq. 1


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_eps_ball_and_unit_box(norm):
    model, x = linear_model(), torch.rand(16, 3, 12, 12)
    y = torch.randint(0, 3, (16,))
    eps, step = arat.THREATS[norm]
    x_adv = arat.pgd(model, x, y, eps, step * 4, 5, norm)
    dist = (x_adv - x).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert (dist <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (dist > eps / 4).any()  # it did move


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_leaves_its_input_unchanged(norm):
    model, x = linear_model(), torch.rand(8, 3, 12, 12)
    before = x.clone()
    arat.pgd(model, x, torch.zeros(8, dtype=torch.long), *arat.THREATS[norm], 3, norm)
    assert torch.equal(x, before)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_raises_the_loss_over_the_clean_input(norm):
    model, x = linear_model(), torch.rand(32, 3, 12, 12)
    y = model(x).argmax(1)  # start from correctly "classified" points
    x_adv = arat.pgd(model, x, y, *arat.THREATS[norm], 10, norm)
    with torch.no_grad():
        clean, adv = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
    assert adv > clean * 1.05


def test_pgd_computes_no_weight_gradients_and_unfreezes_the_weights():
    model = tiny_model()
    arat.pgd(model, torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), 8 / 255, 2 / 255, 2)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def confident_classifier():
    """A classifier sure of class 0 on 3x8x8 images (logit 14 against ~0), and a batch of class 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[0.005], [-0.005]]).expand(2, 4 * 8 * 8))
        model[2].bias.copy_(torch.tensor([14.0, 0.0]))
    return model, torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)


def test_fp16_attack_gradients_do_not_vanish():
    # A confident classifier: p(wrong) ~ e^-14, so dCE/dlogit ~ 1e-6 and the gradient reaching the conv layer,
    # ~5e-9, is below half of fp16's smallest subnormal (6e-8): an unscaled fp16 backward returns exact zeros.
    model, x, y = confident_classifier()

    def input_grad():
        x_ = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_), y, reduction="sum"), x_)
        return g

    assert input_grad().abs().sum() > 0  # fp32: the gradient exists
    with torch.autocast("cpu", dtype=torch.float16):
        assert model(x).dtype == torch.float16
        assert input_grad().abs().sum() == 0  # naive fp16 backward underflows to exact zeros
        x_adv = arat.pgd(model, x, y, 8 / 255, 2 / 255, 1, start="none")
    assert (x_adv - x).abs().amax() > 1 / 255  # pgd still takes a full step


def test_training_attack_moves_only_the_main_bn_statistics_and_the_eval_mode_attack_moves_none():
    model = tiny_model().train()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,))
    bn = model.layer4[1]
    main0, aux0 = bn.main.running_mean.clone(), bn.aux.running_mean.clone()
    arat.arat_attack(model, None, x, y, tiny_cfg(attack_mode="train"))
    assert not torch.equal(bn.main.running_mean, main0) and torch.equal(bn.aux.running_mean, aux0)
    before = buffers(model)
    arat.arat_attack(model, None, x, y, tiny_cfg(attack_mode="eval"))
    assert same_tensors(buffers(model), before) and model.training  # the mode is restored


def test_l2_training_attack_runs_in_eval_mode_by_default_as_released():
    assert arat.resolve(arat.Config(norm="l2")).attack_mode == "eval"
    assert arat.resolve(arat.Config(norm="linf")).attack_mode == "train"


# ------------------------------------------------------------------------------------------------------------- Split BN


def test_split_bn_clean_forward_updates_only_aux_statistics_and_adversarial_only_main():
    model = tiny_model().train()
    bn = model.layer4[1]
    main0, aux0 = bn.main.running_mean.clone(), bn.aux.running_mean.clone()
    with arat.bn_branch(model, "aux"):
        model(torch.rand(8, 3, 8, 8))
    assert torch.equal(bn.main.running_mean, main0) and not torch.equal(bn.aux.running_mean, aux0)
    aux1 = bn.aux.running_mean.clone()
    model(torch.rand(8, 3, 8, 8) + 1)  # outside the block: back on the main BNs
    assert torch.equal(bn.aux.running_mean, aux1) and not torch.equal(bn.main.running_mean, main0)


def test_inference_uses_main_bn_and_merged_model_matches_it():
    model = tiny_model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, arat.SplitBatchNorm2d):
                m.aux.running_mean += 5  # aux differs: would change the output if it were used
    x = torch.rand(4, 3, 8, 8)
    out = model(x)
    merged = arat.merge_split_bn(model).eval()
    assert not any(isinstance(m, arat.SplitBatchNorm2d) for m in merged.modules())
    assert torch.allclose(merged(x), out)


def test_convert_split_bn_works_on_torchvision_resnet18():
    import torchvision

    model = arat.convert_split_bn(torchvision.models.resnet18(num_classes=5))
    splits = [m for m in model.modules() if isinstance(m, arat.SplitBatchNorm2d)]
    unsplit = [n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d and not n.endswith((".main", ".aux"))]
    assert len(splits) == 20 and unsplit == []
    tap = arat.FeatureTap(model, ["layer4.1.bn2", "layer3.0.bn1"])
    assert tap.dims(model, 64) == [512, 256]
    head = nn.Module()
    head.tap, head.predictors = tap, nn.ModuleList(arat.make_predictor(d) for d in (512, 256))
    cfg = arat.resolve(arat.Config(dataset="cifar10", layers="layer4.1.bn2,layer3.0.bn1", attack_steps=1))
    x, y = torch.rand(4, 3, 64, 64), torch.randint(0, 5, (4,))
    aux0 = model.layer1[0].bn1.aux.running_mean.clone()
    x, x_adv = arat.arat_attack(model.train(), head, x, y, cfg)
    loss, terms = arat.arat_loss(model, head, x, x_adv, y, cfg, 0.5, 0.5)
    loss.backward()
    assert math.isfinite(loss.item()) and terms["inv"] > 0
    assert not torch.equal(model.layer1[0].bn1.aux.running_mean, aux0)  # the clean pass used the aux BNs
    assert model.fc.weight.grad.abs().sum() > 0


def test_convert_split_bn_refuses_a_model_with_no_batchnorm2d_to_split():
    for model in (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))):
        with pytest.raises(ValueError, match="no nn.BatchNorm2d to split"):
            arat.convert_split_bn(model)


# ------------------------------------------------------------------------------------------------------ Taps (Sec. 3.5)


def test_taps_pool_the_relu_of_the_module_output_before_the_residual_add():
    torch.manual_seed(0)
    model = arat.build_model("resnet18", 10).eval()
    seen = {}
    model.layer4[0].bn2.register_forward_hook(lambda m, i, out: seen.update(bn2=out.detach()))
    model.layer4[0].register_forward_hook(lambda m, i, out: seen.update(block=out.detach()))
    tap = arat.FeatureTap(model, ["layer4.0.bn2"])
    with torch.no_grad(), tap.capture() as z:
        model(torch.rand(2, 3, 32, 32))
    assert torch.allclose(z["layer4.0.bn2"], F.relu(seen["bn2"]).mean((2, 3)))
    assert not torch.allclose(z["layer4.0.bn2"], seen["block"].mean((2, 3)))  # not the block's output


def test_feature_tap_refuses_a_module_that_runs_twice_and_can_be_removed():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), relu, nn.Conv2d(4, 4, 1), relu)  # one ReLU module, called twice
    tap = arat.FeatureTap(model, ["1"])
    with pytest.raises(RuntimeError, match="ran twice"), tap.capture():
        model(torch.rand(2, 3, 4, 4))
    tap.remove()
    with tap.capture() as z:
        model(torch.rand(2, 3, 4, 4))
    assert z == {}  # no hook left


def test_features_are_captured_only_in_the_loss_passes_not_in_attack_steps():
    model, cfg = tiny_model().train(), tiny_cfg(attack_steps=4)
    head = arat.InvarianceHead(model, cfg)
    seen = []
    model.register_forward_pre_hook(lambda m, i: seen.append(head.tap.feats is not None))
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 3, (4,))
    x, x_adv = arat.arat_attack(model, head, x, y, cfg)
    arat.arat_loss(model, head, x, x_adv, y, cfg, 0.5, 0.5)
    assert seen == [False] * 4 + [True, True]


def test_default_taps_give_the_reference_feature_dimensions():
    expected = {"resnet18": [512] * 4, "preact18": [256, 512, 512, 512, 512], "wrn34": [320] + [640] * 10}
    for arch, dims in expected.items():
        model = arat.build_model(arch, 10)
        assert arat.FeatureTap(model, arat.ARCHS[arch][1]).dims(model, 32) == dims


# ------------------------------------------------------------------------------------------------------------- Eqs. 3-7


def _invariance_grads(stop_grad):
    """Gradients of the invariance term alone, with z (clean, aux BN) and z' (adversarial, main BN) captured."""
    model = tiny_model().train()
    tap = arat.FeatureTap(model, ["layer4.4"])
    predictor = arat.make_predictor(8).train()
    x = torch.rand(8, 3, 8, 8)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    with tap.capture() as z_adv:
        model(x_adv)
    with arat.bn_branch(model, "aux"), tap.capture() as z:
        model(x)
    z["layer4.4"].retain_grad()
    arat.invariance_loss(z_adv["layer4.4"], z["layer4.4"], predictor, stop_grad).backward()
    return model.layer4[4], predictor, z["layer4.4"]


def _grad_norm(params):
    return sum(0.0 if p.grad is None else p.grad.abs().sum().item() for p in params)


def test_stop_grad_gives_zero_gradient_to_aux_bn_and_clean_features():
    split, predictor, z = _invariance_grads(stop_grad=True)
    assert _grad_norm(split.aux.parameters()) == 0.0
    assert z.grad is None or z.grad.abs().sum() == 0
    assert _grad_norm(predictor.parameters()) > 0
    assert _grad_norm(split.main.parameters()) > 0  # the adversarial path learns


def test_without_stop_grad_both_branches_get_gradient():
    split, predictor, z = _invariance_grads(stop_grad=False)
    assert _grad_norm(split.aux.parameters()) > 0 and z.grad.abs().sum() > 0
    assert _grad_norm(split.main.parameters()) > 0 and _grad_norm(predictor.parameters()) > 0


def test_invariance_loss_is_one_minus_cosine():
    z = torch.randn(5, 6)
    assert arat.invariance_loss(z, 3 * z, nn.Identity(), True).abs() < 1e-6
    assert torch.isclose(arat.invariance_loss(z, -z, nn.Identity(), True), torch.tensor(2.0))


def test_predictor_is_applied_to_the_adversarial_feature_only():
    torch.manual_seed(0)
    h, z_adv, z = nn.Linear(6, 6), torch.randn(5, 6), torch.randn(5, 6)
    loss = arat.invariance_loss(z_adv, z, h, True)
    assert torch.isclose(loss, 1 - F.cosine_similarity(h(z_adv), z).mean())
    assert not torch.isclose(loss, 1 - F.cosine_similarity(z_adv, h(z)).mean())  # the swapped reading differs


def test_total_loss_is_alpha_ce_adv_plus_beta_ce_clean_plus_gamma_times_the_mean_distance_over_layers():
    model, cfg = tiny_model().train(), tiny_cfg(gamma=7.0)
    head = arat.InvarianceHead(model, cfg).train()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 3, (6,))
    x_adv = (x + 0.05 * torch.rand_like(x)).clamp(0, 1)
    feats = {}
    for name in ("layer4.2", "layer4.5"):  # hand-written taps: ReLU, then global average pooling
        model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: feats.setdefault(n, []).append(o))
    state, pstate = copy.deepcopy(model.state_dict()), copy.deepcopy(head.state_dict())
    loss, terms = arat.arat_loss(model, head, x, x_adv, y, cfg, 0.3, 0.7)
    model.load_state_dict(state)
    head.load_state_dict(pstate)
    feats.clear()
    ce_adv = F.cross_entropy(model(x_adv), y)
    with arat.bn_branch(model, "aux"):
        ce = F.cross_entropy(model(x), y)
    dist = [
        1 - F.cosine_similarity(h(F.relu(feats[n][0]).mean((2, 3))), F.relu(feats[n][1]).mean((2, 3))).mean()
        for n, h in zip(("layer4.2", "layer4.5"), head.predictors)
    ]
    assert torch.allclose(loss, 0.3 * ce_adv + 0.7 * ce + 7.0 * (dist[0] + dist[1]) / 2)
    assert torch.allclose(terms["inv"], (dist[0] + dist[1]) / 2)


def test_variant_table_equals_table_17():
    assert arat.VARIANTS == {
        "v0": (False, False, False),
        "v1": (True, False, False),
        "v2": (True, True, False),
        "v3": (True, True, True),
    }
    for name, switches in arat.VARIANTS.items():
        cfg = arat.resolve(arat.parse_args(["--variant", name]))
        assert (cfg.stop_grad, cfg.predictor, cfg.split_bn) == switches


def test_individual_switches_override_the_preset():
    cfg = arat.resolve(arat.parse_args(["--variant", "v3", "--no-stop-grad", "--no-predictor"]))
    assert (cfg.stop_grad, cfg.predictor, cfg.split_bn) == (False, False, True)  # Table 17, row (5)
    assert cfg.out.endswith("sg0-pred0-sbn1-s0")


def test_gradient_similarity_is_plus_one_for_aligned_and_minus_one_for_opposed_losses():
    model = TinyNet()
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    loss = model(torch.rand(4, 3, 8, 8)).square().mean()
    sim, conflict = arat.gradient_similarity(loss, 2 * loss, weights)
    assert sim == pytest.approx(1, abs=1e-5) and conflict == 0
    sim, conflict = arat.gradient_similarity(loss, -loss, weights)
    assert sim == pytest.approx(-1, abs=1e-5) and conflict > 0.9  # all weights with a non-zero gradient


def test_plain_at_runs_are_labelled_at_and_skip_the_clean_pass():
    cfg = arat.resolve(arat.parse_args(["--gamma", "0", "--no-auto-balance", "--alpha", "1", "--beta", "0"]))
    assert cfg.out == "runs/cifar10-resnet18-at-s0" and cfg.layers == ""
    model = tiny_model().train()
    head = arat.InvarianceHead(model, dataclasses.replace(cfg, attack_steps=1))
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    x, y = torch.rand(4, 3, 8, 8), torch.zeros(4).long()
    loss, terms = arat.arat_loss(model, head, x, x, y, cfg, 1, 0)
    assert len(calls) == 1 and set(terms) == {"ce_adv", "acc_adv", "cls"} and torch.isclose(loss, terms["ce_adv"])


# ---------------------------------------------------------------------------------------------------------------- Eq. 8


def test_auto_balance_reads_the_auxiliary_bns_and_alpha_plus_beta_is_one():
    model, x = tiny_model(), torch.rand(64, 3, 8, 8)
    with torch.no_grad():
        model.fc.weight.normal_(0, 5), model.fc.bias.zero_()  # predictions that vary from image to image
        y = model(x).argmax(1)  # the main BNs are right on every image
        for m in model.modules():
            if isinstance(m, arat.SplitBatchNorm2d):
                m.aux.weight.normal_(), m.aux.bias.normal_()  # the auxiliary BNs now predict otherwise
        with arat.bn_branch(model, "aux"):
            aux = (model(x).argmax(1) == y).float().mean().item()
    assert aux < 1
    acc = arat.evaluate(model, Batches(x, y), range(64), tiny_cfg(batch_size=16), "aux", attack=False)["clean"]
    alpha, beta = arat.auto_balance(acc / 100)
    assert alpha == pytest.approx(aux) and alpha + beta == pytest.approx(1.0)


def test_evaluation_leaves_every_bn_statistic_unchanged():
    model = tiny_model().train()
    before = buffers(model)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 3, (16,))
    for branch in ("main", "aux"):
        arat.evaluate(model, Batches(x, y), range(16), tiny_cfg(batch_size=8, eval_steps=2), branch)
    assert same_tensors(buffers(model), before) and model.training


# --------------------------------------------------------------------------------------------------- official quirks


def _released_step(model, taps, predictors, x, y, eps, step, steps, alpha, beta, gamma):
    """The released training step, written from its description: the noisy clean batch x + U(-eps, eps) without
    clamping, PGD starting exactly there (train mode, main BNs), each sign step projected on the eps-box around that
    noisy point and then clamped to [0, 1]; the clean branch trains on the noisy batch through the auxiliary BNs."""
    noisy = x + torch.empty_like(x).uniform_(-eps, eps)
    x_adv = noisy.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, noisy - eps), noisy + eps).clamp(0, 1)
    feats = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: feats.setdefault(n, []).append(o))
        for n in taps
    ]
    logits_adv = model(x_adv)
    with arat.bn_branch(model, "aux"):
        logits = model(noisy)
    for hook in hooks:
        hook.remove()
    pooled = {n: [F.relu(o).mean((2, 3)) for o in outs] for n, outs in feats.items()}
    dist = [1 - F.cosine_similarity(h(pooled[n][0]), pooled[n][1].detach()).mean() for n, h in zip(taps, predictors)]
    loss = alpha * F.cross_entropy(logits_adv, y) + beta * F.cross_entropy(logits, y) + gamma * sum(dist) / len(dist)
    return noisy, x_adv, loss


def test_official_quirks_steps_equal_the_released_semantics_in_float64():
    cfg = tiny_cfg(official_quirks=True, attack_steps=4)
    torch.manual_seed(0)
    model = tiny_model().double().train()
    head = arat.InvarianceHead(model, cfg).double().train()
    twin, twin_head = copy.deepcopy(model), copy.deepcopy(head)
    ours, theirs = (
        torch.optim.SGD([*m.parameters(), *h.parameters()], lr=0.1, momentum=0.9, weight_decay=5e-4)
        for m, h in ((model, head), (twin, twin_head))
    )
    taps = cfg.layers.split(",")
    for step in range(3):  # three optimiser steps on the same batches, from the same RNG state
        x, y = torch.rand(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
        x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.0, 1.0  # pixels at the box edges: the noisy batch leaves [0, 1] there
        torch.manual_seed(step)
        clean, x_adv = arat.arat_attack(model, head, x, y, cfg)
        loss, _ = arat.arat_loss(model, head, clean, x_adv, y, cfg, 0.4, 0.6)
        torch.manual_seed(step)
        noisy, ref_adv, ref_loss = _released_step(
            twin, taps, twin_head.predictors, x, y, cfg.eps, cfg.step_size, 4, 0.4, 0.6, cfg.gamma
        )
        assert torch.equal(clean, noisy) and (noisy < 0).any() and (noisy > 1).any()  # the clean batch: unclamped
        assert torch.allclose(x_adv, ref_adv, rtol=0, atol=1e-12)
        assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=0)
        for optimizer, value in ((ours, loss), (theirs, ref_loss)):
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
    for a, b in zip([*model.parameters(), *head.parameters()], [*twin.parameters(), *twin_head.parameters()]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
        assert torch.allclose(
            ours.state[a]["momentum_buffer"], theirs.state[b]["momentum_buffer"], rtol=1e-9, atol=1e-12
        )
    ours_bn, theirs_bn = ([*buffers(m).values(), *buffers(h).values()] for m, h in ((model, head), (twin, twin_head)))
    for a, b in zip(ours_bn, theirs_bn, strict=True):  # both BN sets of the model, and the predictors' BNs
        assert torch.allclose(a.double(), b.double(), rtol=1e-10, atol=0)


def test_official_quirks_add_no_noise_to_l2_training():
    cfg, x, y = tiny_cfg(official_quirks=True, norm="l2"), torch.rand(4, 3, 8, 8), torch.randint(0, 3, (4,))
    clean, _ = arat.arat_attack(tiny_model().train(), None, x, y, cfg)
    assert torch.equal(clean, x)  # torchattacks' PGDL2 copies its input: only the lr schedule changes


def test_lr_schedule_drops_at_75_and_90_percent():
    lrs = [arat.lr_factor(e, (75, 90)) for e in range(100)]
    assert lrs[74] == 1 and lrs[75] == pytest.approx(0.1) and lrs[89] == pytest.approx(0.1)
    assert lrs[90] == pytest.approx(0.01)
    assert arat.resolve(arat.Config(epochs=40)).lr_drops == "30,36"


def test_official_quirks_lr_schedule_is_the_released_one_for_any_lr_and_epochs():
    # epoch 1 at the literal 0.02; after epoch e, get_lr(e): lr up to 75, then /10 per threshold 75, 90, 100, 110
    for lr in (0.1, 0.05):
        lrs = [lr * arat.lr_factor(e, (), official_quirks=True, lr=lr) for e in range(120)]
        assert lrs[0] == pytest.approx(0.02) and lrs[1] == lrs[75] == pytest.approx(lr)
        assert lrs[76] == lrs[90] == pytest.approx(lr / 10) and lrs[91] == lrs[100] == pytest.approx(lr / 100)
        assert lrs[101] == pytest.approx(lr / 1000) and lrs[111] == pytest.approx(lr / 10**4)


def test_official_quirks_run_in_fp32_and_probe_the_auxiliary_bns_once():
    assert arat.resolve(arat.Config(official_quirks=True)).amp == "off"
    for quirks in (False, True):
        model = tiny_model()
        before = buffers(model)
        arat.InvarianceHead(model, tiny_cfg(official_quirks=quirks))
        after = buffers(model)
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        assert moved == ({k for k in before if ".aux." in k} if quirks else set())


def test_official_quirks_keep_the_last_partial_batch(tiny, tmp_path):
    flags = ["--epochs", "1", "--batch-size", "10", "--official-quirks"]
    arat.main(cli(tiny, tmp_path / "quirks", *flags))
    arat.main(cli(tiny, tmp_path / "paper", *flags[:-1]))
    assert read_log(tmp_path / "quirks")[-1]["step"] == 3 and read_log(tmp_path / "paper")[-1]["step"] == 2  # 24 images


# ------------------------------------------------------------------------------------------------------ models, config


def test_single_bn_inference_models_have_the_reference_parameter_counts():
    for arch, count in {"resnet18": 11_173_962, "wrn34": 46_160_474}.items():
        model = arat.merge_split_bn(arat.build_model(arch, 10))
        assert sum(p.numel() for p in model.parameters()) == count


def test_every_config_field_has_a_flag_also_for_subclasses_with_string_annotations(capsys):
    namespace = {}
    source = "from __future__ import annotations\nimport dataclasses, arat\n"
    source += "@dataclasses.dataclass\nclass Sub(arat.Config):\n"
    exec(source + "    knob: float | None = arat.arg(None, 'a knob of a companion file', 'companion')\n", namespace)
    with pytest.raises(SystemExit):
        arat.parse_args(["--help"], config=namespace["Sub"])
    text = capsys.readouterr().out
    assert all(f"--{f.name.replace('_', '-')}" in text for f in dataclasses.fields(namespace["Sub"]))
    assert arat.parse_args(["--knob", "8/255"], config=namespace["Sub"]).knob == pytest.approx(8 / 255)
    exec(source.replace("Sub", "Bad") + "    knob: int = 3\n", namespace)
    with pytest.raises(TypeError, match="arg"):
        arat.parse_args([], config=namespace["Bad"])


def test_workers_default_to_the_cpus_this_process_may_use():
    assert arat.resolve(arat.Config()).workers == min(4, len(os.sched_getaffinity(0)))


# ----------------------------------------------------------------------------------------------------------------- data


def write_cifar10(root, n_train=40, n_test=16):
    """Files in the layout of the CIFAR-10 python release (cifar-10-batches-py/), with random pixels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": n_train // 5 for i in range(1, 6)} | {"test_batch": n_test}
    for name, n in batches.items():
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    return root


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kw: True)  # md5s of real files
    return write_cifar10(tmp_path / "data")


def test_cifar10_loader_reads_the_python_release_and_trains_on_it(cifar, tmp_path):
    cfg = arat.resolve(arat.Config(dataset="cifar10", data_dir=str(cifar), download=False, workers=0))
    train, test, classes = arat.load_data(cfg, torch.device("cpu"))
    assert (len(train.targets), len(test.targets), classes) == (40, 16, 10)
    (x, y), (x2, _) = next(train.batches([torch.arange(4)], seed=1)), next(train.batches([torch.arange(4)]))
    assert x.shape == (4, 3, 32, 32) and 0 <= x.min() and x.max() <= 1 and not torch.equal(x, x2)  # augmented
    assert y.tolist() == train.targets[:4]
    part = next(train.batches([torch.tensor([3, 1])], seed=1))[0]  # each image's augmentation, whatever its batch
    assert torch.equal(part, x[[3, 1]])
    assert torch.equal(next(test.batches([torch.arange(4)]))[0], next(test.batches([torch.arange(4)]))[0])
    metrics = arat.main(cli("cifar10", tmp_path / "run", "--data-dir", str(cifar), "--no-download", "--max-steps", "2"))
    assert metrics["n_eval"] == 8 and metrics["config"]["image_size"] == 32
    assert metrics["config"]["eval_eps"] == 8 / 255 and metrics["config"]["eps"] == 8 / 255


def test_imagenette_loader_reads_the_160px_release_and_crops_128_without_resizing(tmp_path):
    for split in ("train", "val"):
        for k, wnid in enumerate(["n01440764", "n02102040"]):  # tench, English springer
            folder = tmp_path / "imagenette2-160" / split / wnid
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = np.random.default_rng(10 * k + i).integers(0, 256, (160, 200, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG", format="PNG")  # lossless, whatever the name
    cfg = arat.resolve(arat.Config(dataset="imagenette", data_dir=str(tmp_path), download=False, workers=0))
    assert cfg.image_size == 128  # as released: 128 px crops of the 160 px images
    train, test, classes = arat.load_data(cfg, torch.device("cpu"))
    assert (len(train.targets), len(test.targets), classes) == (6, 6, 2)
    x = next(test.batches([torch.tensor([0])]))[0][0]
    original = torch.from_numpy(np.array(Image.open(test.plain.samples[0][0]).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(x, original[:, 16:144, 36:164].float() / 255)  # the centre crop, pixel for pixel
    assert next(train.batches([torch.tensor([0])], seed=0))[0].shape == (1, 3, 128, 128)


def test_folder_dataset_keeps_the_size_of_its_images(tiny):
    assert arat.resolve(arat.Config(dataset=str(tiny))).image_size == 16


def test_folder_evaluation_subset_is_class_balanced_and_the_same_for_every_run(tiny):
    cfg = arat.resolve(arat.Config(dataset=str(tiny), workers=0))
    _, test, _ = arat.load_data(cfg, torch.device("cpu"))
    assert test.targets == sorted(test.targets)  # stored class by class
    picked = arat.eval_indices(cfg, test, 6)
    assert sorted(test.targets[i] for i in picked) == [0, 0, 1, 1, 2, 2]
    assert picked == arat.eval_indices(dataclasses.replace(cfg, seed=5), test, 6)
    assert arat.eval_indices(dataclasses.replace(cfg, dataset="cifar10"), test, 6) == list(range(6))  # CIFAR: first N


# ----------------------------------------------------------------------------------------------------------------- main


@pytest.mark.parametrize("variant", ["v0", "v1", "v2", "v3"])
def test_main_smoke_run_of_each_variant_writes_all_outputs(tiny, tmp_path, variant):
    flags = ["--variant", variant, "--epochs", "3", "--max-steps", "4", "--grad-sim-every", "1"]
    metrics = arat.main(cli(tiny, tmp_path / variant, *flags))
    out = tmp_path / variant
    assert {p.name for p in out.iterdir()} == {"config.json", "log.jsonl", "last.pt", "metrics.json"}
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert {"clean_acc", "pgd3_acc", "n_eval", "feature_cos_sim", "grad_sim", "conflict_frac"} <= set(metrics)
    assert metrics["n_eval"] == 8 and (metrics["pgd3_acc_aux"] is None) == (variant != "v3")
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2] and log[-1]["step"] == 4  # 3 steps per epoch
    for r in log:
        assert all(math.isfinite(r[k]) for k in ("loss", "ce_adv", "ce_clean", "inv"))
        assert -1 <= r["grad_sim"] <= 1 and 0 <= r["conflict_frac"] <= 1
        assert r["alpha"] + r["beta"] == pytest.approx(1) and r["alpha"] == pytest.approx(r["balance_acc"] / 100)
    assert (log[-1]["clean_acc_aux"] is None) == (variant != "v3")
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert {"model", "extra", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "config"} <= set(ckpt)
    assert ckpt["config"]["variant"] == variant and not any("_orig_mod" in k for k in ckpt["model"])
    assert json.loads((out / "config.json").read_text()) == ckpt["config"]


def test_training_prints_a_short_summary_with_the_lr_of_each_phase(tiny, tmp_path, capsys):
    arat.main(cli(tiny, tmp_path / "run", "--epochs", "10", "--max-steps", "1", "--lr-drops", "4,9"))
    out = capsys.readouterr().out
    assert "lr 0.1 (epochs 1-4), 0.01 (epochs 5-9), 0.001 (epoch 10)\n" in out
    assert "attack: PGD-2 linf eps 8/255 step 2/255\n" in out
    assert not any(line.startswith("{") for line in out.splitlines())  # the config is in config.json


def test_l2_and_official_quirks_runs_complete_through_main(tiny, tmp_path):
    for name, flags in {"l2": ["--norm", "l2"], "quirks": ["--official-quirks"]}.items():
        metrics = arat.main(cli(tiny, tmp_path / name, "--epochs", "1", "--max-steps", "2", *flags))
        assert metrics["norm"] == ("l2" if name == "l2" else "linf") and 0 <= metrics["pgd3_acc"] <= 100


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tiny, tmp_path, monkeypatch):
    flags = ["--epochs", "2", "--eval-every", "5"]
    arat.main(cli(tiny, tmp_path / "straight", *flags))
    save = arat.save_checkpoint

    def save_then_stop(state, path):
        save(state, path)
        raise KeyboardInterrupt  # the run dies right after its first checkpoint

    monkeypatch.setattr(arat, "save_checkpoint", save_then_stop)
    with pytest.raises(SystemExit) as stopped:
        arat.main(cli(tiny, tmp_path / "resumed", *flags))
    assert stopped.value.code == 130
    monkeypatch.setattr(arat, "save_checkpoint", save)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["epoch"] == 1
    arat.main(cli(tiny, tmp_path / "resumed", *flags, "--resume"))
    for key in ("model", "extra"):
        assert same_tensors(
            weights(tmp_path / "straight" / "last.pt", key), weights(tmp_path / "resumed" / "last.pt", key)
        )
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [r["epoch"] for r in resumed] == [1, 2]  # epoch 1's line, lost with the run, restored from last.pt
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]


def test_a_run_stopped_inside_an_epoch_resumes_where_it_stopped(tiny, tmp_path):
    arat.main(cli(tiny, tmp_path / "straight", "--epochs", "3", "--max-steps", "5"))
    arat.main(cli(tiny, tmp_path / "split", "--epochs", "3", "--max-steps", "2"))  # inside epoch 1 (3 steps)
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=False)["batch"] == 2
    metrics = arat.main(cli(tiny, tmp_path / "split", "--epochs", "3", "--max-steps", "5", "--resume"))
    assert same_tensors(weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "split" / "last.pt"))
    split, straight = read_log(tmp_path / "split"), read_log(tmp_path / "straight")
    assert metrics["steps"] == 5 and [r["step"] for r in split] == [3, 5]  # one record per epoch
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]  # averaged over all the epoch's steps


def interrupted(flags, after):
    """Runs arat.py with Ctrl-C's SIGINT sent once a line starting with `after` appears: (exit code, stderr)."""
    child = subprocess.Popen(
        [sys.executable, "-u", arat.__file__, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background process inherits it ignored
    )
    for line in child.stdout:
        if line.startswith(after):
            child.send_signal(signal.SIGINT)
            break
    return child.wait(timeout=600), child.stderr.read()


def test_ctrl_c_writes_the_mid_epoch_checkpoint_and_resume_ends_as_an_uninterrupted_run(tiny, tmp_path):
    # 12 steps of 2 images: however late the signal arrives, it lands inside the epoch
    flags = [*FAST.split(), "--batch-size", "2", "--dataset", str(tiny), "--epochs", "1"]
    code, err = interrupted([*flags, "--out", str(tmp_path / "stopped")], after="epoch 1 step 1/12")
    ckpt = torch.load(tmp_path / "stopped" / "last.pt", weights_only=False)
    assert code == 130 and ckpt["epoch"] == 0 and 1 <= ckpt["batch"] < 12  # the step under way is finished
    where = f"{tmp_path / 'stopped' / 'last.pt'} holds epoch 1, step {ckpt['batch']}"
    assert err.strip().splitlines()[-1] == f"arat.py: interrupted; {where}: add --resume to the command to go on"
    arat.main(arat.parse_args([*flags, "--out", str(tmp_path / "stopped"), "--resume"]))
    arat.main(arat.parse_args([*flags, "--out", str(tmp_path / "straight")]))
    for key in ("model", "extra"):
        assert same_tensors(
            weights(tmp_path / "stopped" / "last.pt", key), weights(tmp_path / "straight" / "last.pt", key)
        )
    assert [r["loss"] for r in read_log(tmp_path / "stopped")] == [r["loss"] for r in read_log(tmp_path / "straight")]
    evaluation = ["--eval-only", "--checkpoint", str(tmp_path / "straight" / "last.pt"), "--eval-steps", "5000"]
    code, err = interrupted([*FAST.split(), *evaluation], after="loaded")
    assert code == 130 and err.strip() == "arat.py: interrupted"  # nothing to resume


def test_a_moved_run_resumes_and_a_finished_one_is_left_as_it_is(tiny, tmp_path, monkeypatch, capsys):
    arat.main(cli(tiny, tmp_path / "a", "--epochs", "2", "--max-steps", "2"))
    (tmp_path / "b").mkdir()
    (tmp_path / "a").rename(tmp_path / "b" / "moved")
    monkeypatch.chdir(tmp_path / "b")  # the dataset given by another path to the same folder
    flags = ["--dataset", os.path.relpath(tiny), "--epochs", "2", "--max-steps", "4", "--eval-n", "100", "--resume"]
    resumed = arat.main(arat.parse_args([*FAST.split(), "--out", "moved", *flags]))
    assert resumed["steps"] == 4 and resumed["config"]["out"] == "moved"
    assert "--eval-n: the test set has 12 images, not 100: all are evaluated" in capsys.readouterr().out
    metrics = (tmp_path / "b" / "moved" / "metrics.json").read_text()
    assert arat.main(arat.parse_args([*FAST.split(), "--out", "moved", *flags])) == {}
    out = capsys.readouterr().out
    assert out == "arat.py: this run has finished (moved/metrics.json); use --eval-only to evaluate it again\n"
    assert (tmp_path / "b" / "moved" / "metrics.json").read_text() == metrics
    with pytest.raises(SystemExit) as exit_info:
        arat.main(baseline_args(*FAST.split(), "--out", "moved", *flags), baselines.setup, "baselines.py")
    assert (
        exit_info.value.code == 2 and "was trained by arat.py: resume it with that command" in capsys.readouterr().err
    )


def test_short_run_learns_an_easy_task_well_above_chance(tmp_path):
    data = write_folder(tmp_path / "colours", n_train=32, n_val=16, classes=4, seed=1)
    metrics = arat.main(cli(data, tmp_path / "run", "--batch-size", "16", "--epochs", "4", "--eval-n", "64"))
    assert metrics["clean_acc"] >= 75  # chance is 25%


BAD_INPUTS = {
    "unknown arch": (["--arch", "resnet50"], "--arch: invalid choice 'resnet50' (choose from resnet18"),
    "unknown variant": (["--variant", "v9"], "--variant: invalid choice 'v9' (choose from v0, v1, v2, v3)"),
    "unknown dataset": (["--dataset", "cifar11"], "--dataset: 'cifar11' is neither one of cifar10, cifar100"),
    "unknown norm": (["--norm", "l1"], "--norm: invalid choice 'l1' (choose from linf, l2)"),
    "unknown amp": (["--amp", "fp8"], "--amp: invalid choice 'fp8' (choose from bf16, fp16, off)"),
    "alpha with auto-balance": (["--alpha", "0.5"], "--alpha/--beta: fixed weights need --no-auto-balance"),
    "negative eps": (["--eps", "-1"], "--eps: must be positive"),
    "not a number": (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    "cifar resized": (["--image-size", "64"], "--image-size: CIFAR images are 32x32"),
    "bad lr drops": (["--lr-drops", "75;90"], "--lr-drops: give epochs separated by commas"),
    "cifar missing offline": (["--no-download", "--data-dir", "{tmp}"], "--dataset cifar10: not found in"),
    "resume without checkpoint": (["--resume", "--out", "{tmp}/none"], "--resume: there is no checkpoint at"),
    "eval-only without checkpoint": (["--eval-only"], "--eval-only: give the model to evaluate with --checkpoint"),
    "unreadable checkpoint": (["--eval-only", "--checkpoint", "{tmp}/none.pt"], "--checkpoint: cannot read"),
    "mixed image sizes": (["--dataset", "{mixed}"], "mixes sizes"),
    "autoattack on 3 classes": (
        ["--dataset", "{tiny}", "--out", "{tmp}/run", "--aa-n", "8"],
        "--aa-n: standard AutoAttack needs at least 10 classes",
    ),
    "abbreviated flag": (["--epoch", "1"], "unrecognized arguments: --epoch 1"),
    "eps in pixels": (["--eps", "8"], "--eps: an L-inf budget of 8 spans all of [0, 1]; try 8/255"),
    "eval-eps in pixels": (["--eval-eps", "4"], "--eval-eps: an L-inf budget of 4 spans all of [0, 1]; try 8/255"),
    "fp16 on a cpu": (["--amp", "fp16", "--device", "cpu"], "--amp fp16: a CPU emulates fp16"),
    "out is a file": (["--out", "{tmp}/file/run"], "--out: cannot write in {tmp}/file/run: {tmp}/file is not a folder"),
    "export under a file": (["--export", "{tmp}/file/m.pt"], "--export: cannot write in {tmp}/file: {tmp}/file is not"),
    "corrupt last.pt": (["--dataset", "{tiny}", "--resume", "--out", "{corrupt}"], "--resume: cannot read {corrupt}/"),
    "baselines run resumed by arat.py": (
        ["--dataset", "{tiny}", "--resume", "--out", "{baseline}"],
        "was trained by baselines.py --method trades: resume it with that command",
    ),
    "export without its dataset": (["--eval-only", "--checkpoint", "{export}"], "is an exported model, which does not"),
    "eval-only with another arch": (
        ["--eval-only", "--checkpoint", "{export}", "--dataset", "{tiny}", "--arch", "wrn34"],
        "--arch: {export} holds a resnet18, not a wrn34; leave --arch out",
    ),
    "unknown layer": (
        ["--dataset", "{tiny}", "--out", "{tmp}/run", "--batch-size", "8", "--layers", "layer4.0.bn9"],
        "--layers: the model has no module 'layer4.0.bn9' (layer4.0.bn2, layer4.0.bn1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_a_one_line_message(case, tiny, tmp_path, capsys):
    flags, message = BAD_INPUTS[case]
    mixed = write_folder(tmp_path / "mixed", 1, 1, classes=2)
    Image.new("RGB", (20, 16)).save(mixed / "val" / "class1" / "wide.png")
    (tmp_path / "file").write_text("")
    paths = {"tmp": tmp_path, "tiny": tiny, "mixed": mixed, "export": tmp_path / "m.pt"}
    paths |= {"corrupt": tmp_path / "corrupt", "baseline": tmp_path / "baseline"}
    for run, truncate in ((paths["corrupt"], True), (paths["baseline"], False)):
        run.mkdir()
        torch.save({"config": {"method": "trades"}}, run / "last.pt")
        if truncate:
            (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:100])
    if "{export}" in " ".join(flags):
        torch.save(arat.build_model("resnet18", 3, split_bn=False).state_dict(), paths["export"])
    flags = [f.format(**paths) for f in flags]
    message = message.format(**paths)
    with pytest.raises(SystemExit) as exit_info:
        arat.main(arat.parse_args([*flags, "--workers", "0"]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("arat.py: error: ") and message in err, err


# ---------------------------------------------------------------------------------------------- evaluation, AutoAttack


def test_autoattack_breaks_what_pgd_breaks_and_records_each_attack(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(layer4=nn.Flatten(), fc=nn.Linear(3 * 8 * 8, 10)))
    x = torch.rand(16, 3, 8, 8)
    y = model(x).argmax(1)  # 100% clean accuracy by construction
    cfg = arat.resolve(arat.Config(dataset="cifar10", eval_eps=1 / 255, eval_step_size=0.25 / 255, batch_size=8))
    pgd_acc = arat.evaluate(model, Batches(x, y), range(16), cfg, attack=True)
    aa = arat.autoattack(model, Batches(x, y), range(16), dataclasses.replace(cfg, out=str(tmp_path)), every=0)
    out = capsys.readouterr().out  # a line after each attack, and inside attacks (every 0 s here)
    assert re.search(r"robust accuracy after APGD-CE: [\d.]+% \(total time [\d.]+ s\)", out)
    assert re.search(r"^AutoAttack: \d+ images through the model in \d+ s$", out, re.M)
    assert 0 < aa["acc"] <= pgd_acc["robust"] < 100  # a budget small enough that some points survive both
    assert aa["package"] in ("autoattack", "pyautoattack") and aa["version"] == "standard" and aa["n"] == 16
    assert aa["eps"] == 1 / 255 and aa["seed"] == 0 and aa["package_version"] != "unknown"
    assert set(aa["after"]) <= {"apgd-ce", "apgd-t", "fab-t", "square"} and aa["after"]["apgd-ce"] >= aa["acc"]


def test_autoattack_calls_the_original_package_with_its_own_api(monkeypatch, tmp_path):
    import sys
    import types

    calls = {}

    class OriginalAutoAttack:  # the signature of the original package's class and method
        def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True, attacks_to_run=(), version="standard",
                     is_tf_model=False, device="cuda", log_path=None):  # fmt: skip
            calls["init"] = {"norm": norm, "eps": eps, "version": version, "device": str(device), "seed": seed}
            self.log_path = log_path

        def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False):
            calls["run"] = {"n": len(x_orig), "bs": bs, "return_labels": return_labels}
            with open(self.log_path, "a") as f:  # as the original's logger does
                f.write("robust accuracy after APGD-CE: 50.00% (total time 0.1 s)\n")
            return x_orig, torch.where(torch.arange(len(y_orig)) % 2 == 0, y_orig, -1)  # every other one broken

    monkeypatch.setitem(
        sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=OriginalAutoAttack, __name__="autoattack")
    )
    x, y = torch.rand(10, 3, 4, 4), torch.arange(10) % 3
    cfg = arat.resolve(arat.Config(dataset="cifar10", norm="l2", batch_size=4, out=str(tmp_path)))
    aa = arat.autoattack(nn.Flatten(), Batches(x, y), range(8), cfg)
    assert aa["acc"] == 50.0 and aa["after"] == {"apgd-ce": 50.0} and aa["package"] == "autoattack"
    assert calls == {
        "init": {"norm": "L2", "eps": 0.5, "version": "standard", "device": "cpu", "seed": 0},
        "run": {"n": 8, "bs": 4, "return_labels": True},
    }


def test_an_adversarial_example_outside_its_ball_stops_the_evaluation(monkeypatch):
    monkeypatch.setattr(arat, "pgd", lambda model, x, y, eps, *args: (x + 2 * eps).clamp(0, 1))
    x, y = torch.rand(8, 3, 8, 8) * 0.5, torch.randint(0, 3, (8,))
    with pytest.raises(arat.EvaluationError, match="lies 0.0627451 from its image"):
        arat.evaluate(tiny_model(), Batches(x, y), range(8), tiny_cfg())


def test_autoattack_above_pgd_stops_the_run_with_exit_code_3(cifar, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(arat, "autoattack", lambda model, data, idx, cfg: {"acc": 100.0, "n": len(idx)})
    flags = ["--data-dir", str(cifar), "--no-download", "--max-steps", "1", "--aa-n", "8"]
    with pytest.raises(SystemExit) as exit_info:
        arat.main(cli("cifar10", tmp_path / "run", *flags))
    assert exit_info.value.code == 3 and "AutoAttack accuracy 100.00% exceeds PGD-3's" in capsys.readouterr().err


@pytest.mark.skipif(not arat.bf16_supported("cpu"), reason="this CPU emulates bf16 (AVX2 only): far too slow to test")
def test_bf16_attack_finds_examples_as_strong_as_fp32_on_a_trained_model():
    torch.manual_seed(0)
    model = TinyNet(classes=4, width=16)
    colours = torch.tensor(COLOURS, dtype=torch.float32) / 255
    y = torch.randint(0, 4, (256,))
    x = (colours[y][:, :, None, None] + 0.25 * torch.randn(256, 3, 8, 8)).clamp(0, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model = arat.convert_split_bn(model)
    cfg = tiny_cfg(eval_eps=0.2, eval_step_size=0.05, eval_steps=10, batch_size=128)
    fp32 = arat.evaluate(model, Batches(x, y), range(256), cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = arat.evaluate(model, Batches(x, y), range(256), cfg)
    assert fp32["clean"] > 90 and 10 < fp32["robust"] < 90  # a model that PGD half breaks
    assert abs(bf16["robust"] - fp32["robust"]) <= 3


# ------------------------------------------------------------------------------------- SWA, eval-only, export, analyses


def test_swa_with_equal_weights_is_the_mean_of_the_snapshots(tiny, tmp_path, monkeypatch):
    snapshots, step = [], arat.Run.train_step

    def recording_step(self, *args, **kw):
        terms = step(self, *args, **kw)
        snapshots.append({k: v.clone() for k, v in self.model.named_parameters()})
        return terms

    monkeypatch.setattr(arat.Run, "train_step", recording_step)
    run = arat.Run(
        arat.resolve(cli(tiny, tmp_path / "swa", "--epochs", "2", "--swa", "--swa-start", "2", "--swa-every", "2"))
    )
    run.train()
    averaged = snapshots[3:6:2]  # steps 4 and 6: the even steps of epoch 2 (3 steps per epoch)
    assert run.swa.n_averaged == 2
    for name, p in run.swa.module.named_parameters():
        assert torch.allclose(p, torch.stack([s[name] for s in averaged]).mean(0))


def test_bn_reestimation_gives_the_exact_statistics_of_its_data_and_leaves_the_attack_passes_out(monkeypatch, capsys):
    model = tiny_model().train()
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 3, (16,))

    def attack(model, x, y, *args):
        moved = buffers(model)
        model(x + 0.1)  # a forward pass in train mode, as an attack step makes
        assert same_tensors(buffers(model), moved)
        return x + 0.05

    monkeypatch.setattr(arat, "pgd", attack)
    no_autocast = functools.partial(torch.autocast, "cpu", enabled=False)
    arat.reestimate_bn(model, Batches(x, y), range(16), tiny_cfg(batch_size=8), no_autocast)
    assert re.search(r"^SWA BN statistics: batch 2/2 \| [\d.]+ it/s \| ETA 0:00:00$", capsys.readouterr().out, re.M)
    bn, conv = model.layer4[1], model.layer4[0]
    with torch.no_grad():
        order = torch.cat(arat.index_batches(range(16), 8, seed=0))
        for branch, inputs in (("main", x[order] + 0.05), ("aux", x[order])):
            h = conv(inputs).transpose(0, 1).flatten(1)  # channels x (images . pixels), batch by batch
            halves = h.view(len(h), 2, -1)
            assert torch.allclose(getattr(bn, branch).running_mean, h.mean(1), atol=1e-6)
            assert torch.allclose(getattr(bn, branch).running_var, halves.var(2).mean(1), atol=1e-6)


def test_a_swa_run_writes_swa_pt_and_reports_the_average(tiny, tmp_path):
    metrics = arat.main(cli(tiny, tmp_path / "run", "--epochs", "2", "--swa", "--swa-start", "1", "--swa-every", "1"))
    swa = torch.load(tmp_path / "run" / "swa.pt", weights_only=False)
    assert swa["n_averaged"] == 6 and {"swa_clean_acc", "swa_pgd3_acc", "swa_clean_acc_aux"} <= set(metrics)
    evaluated = arat.main(
        arat.parse_args(["--eval-only", "--checkpoint", str(tmp_path / "run" / "swa.pt"), *FAST.split()])
    )
    assert evaluated["clean_acc"] == metrics["swa_clean_acc"] and evaluated["pgd3_acc"] == metrics["swa_pgd3_acc"]


def test_swa_resumes_with_the_run(tiny, tmp_path, monkeypatch):
    flags = ["--epochs", "2", "--swa", "--swa-start", "1", "--swa-every", "2"]
    arat.main(cli(tiny, tmp_path / "straight", *flags))
    save = arat.save_checkpoint

    def save_then_stop(state, path):
        save(state, path)
        if path.name == "last.pt":  # the run dies once last.pt, SWA average included, holds epoch 1
            raise KeyboardInterrupt

    monkeypatch.setattr(arat, "save_checkpoint", save_then_stop)
    with pytest.raises(SystemExit):
        arat.main(cli(tiny, tmp_path / "resumed", *flags))
    monkeypatch.setattr(arat, "save_checkpoint", save)
    assert not (tmp_path / "resumed" / "swa.pt").exists()
    arat.main(cli(tiny, tmp_path / "resumed", *flags, "--resume"))
    a, b = (torch.load(tmp_path / run / "swa.pt", weights_only=False) for run in ("straight", "resumed"))
    assert a["n_averaged"] == b["n_averaged"] == 3 and same_tensors(a["model"], b["model"])


def test_eval_only_reproduces_the_accuracy_the_training_run_reported(tiny, tmp_path, capsys):
    trained = arat.main(cli(tiny, tmp_path / "run", "--epochs", "1"))
    flags = ["--eval-only", "--checkpoint", str(tmp_path / "run" / "last.pt"), *FAST.split()]
    capsys.readouterr()
    evaluated = arat.main(arat.parse_args(flags))
    assert capsys.readouterr().out.startswith(
        f"loaded {tmp_path}/run/last.pt: resnet18, 3 classes, trained to epoch 1\n"
    )
    for key in ("clean_acc", "pgd3_acc", "clean_acc_aux", "pgd3_acc_aux", "feature_cos_sim"):
        assert evaluated[key] == trained[key], key
    assert (tmp_path / "run" / "eval-last" / "metrics.json").exists()


def test_export_loads_strictly_into_the_single_bn_model_with_identical_logits(tiny, tmp_path, capsys):
    arat.main(cli(tiny, tmp_path / "run", "--epochs", "1", "--export", str(tmp_path / "new" / "model.pt")))
    assert (
        f"-> {tmp_path}/new/model.pt (the inference model: resnet18, main BNs, 3 classes)\n" in capsys.readouterr().out
    )
    (tmp_path / "new" / "model.pt").rename(tmp_path / "model.pt")
    split = arat.build_model("resnet18", 3)
    split.load_state_dict(weights(tmp_path / "run" / "last.pt"))
    plain = arat.build_model("resnet18", 3, split_bn=False)
    plain.load_state_dict(torch.load(tmp_path / "model.pt"), strict=True)
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(plain.eval()(x), split.eval()(x))
    evaluated = arat.main(
        arat.parse_args(
            ["--eval-only", "--checkpoint", str(tmp_path / "model.pt"), "--dataset", str(tiny), *FAST.split()]
        )
    )
    assert evaluated["config"]["arch"] == "resnet18" and evaluated["clean_acc_aux"] is None
    assert capsys.readouterr().out.startswith(f"loaded {tmp_path}/model.pt: resnet18, 3 classes\n")


def test_measuring_grad_sim_does_not_change_the_trained_weights(tiny, tmp_path):
    arat.main(cli(tiny, tmp_path / "plain", "--epochs", "1"))
    arat.main(cli(tiny, tmp_path / "measured", "--epochs", "1", "--grad-sim-every", "1"))
    assert same_tensors(weights(tmp_path / "plain" / "last.pt"), weights(tmp_path / "measured" / "last.pt"))
    assert "grad_sim" in read_log(tmp_path / "measured")[0] and "grad_sim" not in read_log(tmp_path / "plain")[0]


def test_held_out_images_never_train_and_best_pt_is_the_top_validation_evaluation(tiny, tmp_path, monkeypatch):
    trained, batches = [], arat.Images.batches

    def recording(self, index_batches, seed=None):
        if seed is not None:  # augmented passes: the training batches and Eq. 8's sample
            trained.extend(i for b in index_batches for i in b.tolist())
        return batches(self, index_batches, seed)

    monkeypatch.setattr(arat.Images, "batches", recording)
    metrics = arat.main(cli(tiny, tmp_path / "run", "--epochs", "3", "--eval-every", "1", "--val-n", "6"))
    held_out = arat.balanced_order([c for c in range(3) for _ in range(8)])[:6]
    assert trained and not set(trained) & set(held_out)
    log = read_log(tmp_path / "run")
    best = max(log, key=lambda r: (r["val_pgd_acc"], -r["epoch"]))
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=False)["best"]["epoch"] == best["epoch"]
    assert metrics["best_epoch"] == best["epoch"] and {"best_clean_acc", "best_pgd3_acc"} <= set(metrics)


def test_bn_stats_logs_how_much_each_bn_set_moves(tiny, tmp_path):
    arat.main(cli(tiny, tmp_path / "run", "--epochs", "1", "--bn-stats"))
    record = read_log(tmp_path / "run")[0]
    assert record["bn_var_main"] > 0 and record["bn_var_aux"] > 0


def test_tensorboard_writes_scalars_or_says_how_to_install_it(tiny, tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit):
            arat.main(cli(tiny, tmp_path / "run", "--epochs", "1", "--tensorboard"))
        assert "pip install tensorboard" in capsys.readouterr().err
    else:
        arat.main(cli(tiny, tmp_path / "run", "--epochs", "1", "--tensorboard"))
        assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------------------------------------ baselines


def baseline_args(*flags):
    return arat.parse_args(list(flags), config=baselines.BaselineConfig, prog="baselines.py")


def _two_passes(model, x, x_adv):
    """The clean and adversarial logits of a train-mode model, as the losses compute them."""
    return model(x), model(x_adv)


def _batch():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    return x, (x + 0.1 * torch.randn_like(x)).clamp(0, 1), torch.tensor([0, 1, 2, 0, 1, 2])


def test_trades_loss_is_ce_plus_beta_times_the_batch_mean_kl_from_clean_to_adversarial():
    (x, x_adv, y), model = _batch(), TinyNet().train()
    loss, _ = baselines.trades_loss(model, None, x, x_adv, y, types.SimpleNamespace(trades_beta=6.0), 1, 0)
    logits, logits_adv = _two_passes(model, x, x_adv)
    p, q = logits.softmax(1), logits_adv.softmax(1)
    kl = (p * (p.log() - q.log())).sum(1).mean()  # summed over classes, averaged over the batch
    assert torch.allclose(loss, F.cross_entropy(logits, y) + 6 * kl)
    assert not torch.isclose(kl, (q * (q.log() - p.log())).sum(1).mean())  # the other direction differs


def test_mart_loss_is_the_boosted_ce_plus_the_misclassification_weighted_kl():
    (x, x_adv, y), model = _batch(), TinyNet().train()
    loss, _ = baselines.mart_loss(model, None, x, x_adv, y, types.SimpleNamespace(trades_beta=5.0), 1, 0)
    logits, logits_adv = _two_passes(model, x, x_adv)
    p, q = logits.softmax(1), logits_adv.softmax(1)
    wrong = q.masked_fill(F.one_hot(y, 3).bool(), -1).argmax(1)  # the most likely wrong class of each x'
    boosted = F.cross_entropy(logits_adv, y) - torch.log(1.0001 - q[range(6), wrong] + 1e-12).mean()
    kl = (p * (p.log() - torch.log(q + 1e-12))).sum(1)
    assert torch.allclose(loss, boosted + 5.0 * (kl * (1.0000001 - p[range(6), y])).mean())


def test_lbgat_loss_is_teacher_ce_plus_mse_and_the_teacher_learns_from_both_terms():
    (x, x_adv, y), model, teacher = _batch(), TinyNet().train(), TinyNet().train()
    loss, terms = baselines.lbgat_loss(model, teacher, x, x_adv, y, types.SimpleNamespace(trades_beta=0.0), 1, 0)
    logits_teacher = teacher(x)
    assert torch.allclose(loss, F.cross_entropy(logits_teacher, y) + F.mse_loss(model(x_adv), logits_teacher))
    for term in ("ce_teacher", "mse"):
        grads = torch.autograd.grad(terms[term], list(teacher.parameters()), retain_graph=True)
        assert sum(g.abs().sum() for g in grads) > 0, term


def test_asym_trades_kl_sends_no_gradient_to_the_auxiliary_branch():
    (x, x_adv, y), model = _batch(), tiny_model().train()
    loss, terms = baselines.asym_trades_loss(model, None, x, x_adv, y, types.SimpleNamespace(asym_lambda=6.0), 0.4, 0.6)
    logits_adv = model(x_adv)
    with arat.bn_branch(model, "aux"):
        logits = model(x)
    p, q = logits.softmax(1), logits_adv.softmax(1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    expected = 0.4 * F.cross_entropy(logits_adv, y) + 0.6 * F.cross_entropy(logits, y) + 6.0 * kl
    assert torch.allclose(loss, expected)
    splits = [m for m in model.modules() if isinstance(m, arat.SplitBatchNorm2d)]
    aux = [p for m in splits for p in m.aux.parameters()]
    main = [p for m in splits for p in m.main.parameters()]
    grads = torch.autograd.grad(terms["kl"], aux + main, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads[: len(aux)])
    assert sum(g.abs().sum() for g in grads[len(aux) :] if g is not None) > 0


def test_trades_attack_with_the_clean_probabilities_computed_once_equals_the_official_one():
    # float64, to the last bit's rounding: pgd steps delta = x' - x where the official loop steps x' itself
    (x, _, y), model = (t.double() if t.is_floating_point() else t for t in _batch()), TinyNet().double().train()
    cfg = types.SimpleNamespace(attack_steps=5, step_size=0.007, eps=0.031, norm="linf")
    torch.manual_seed(3)
    _, x_adv = baselines.trades_attack(model, None, x, y, cfg)
    torch.manual_seed(3)
    model.eval()  # the official loop: p(x) recomputed at every step
    official = x + 0.001 * torch.randn_like(x)
    for _ in range(5):
        official.requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(official), 1), F.softmax(model(x), 1), reduction="sum")
        (grad,) = torch.autograd.grad(loss, official)
        official = torch.min(torch.max(official.detach() + 0.007 * grad.sign(), x - 0.031), x + 0.031).clamp(0, 1)
    assert torch.allclose(x_adv, official, rtol=0, atol=1e-15)


def _bn_randomised(seed):
    """A float64 TinyNet in train mode with its BN affine parameters and running statistics randomised, so that a
    forward pass in the wrong mode, order or number shows in the statistics and the outputs."""
    torch.manual_seed(seed)
    model = TinyNet().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model.train()


def _official_attack(model, x, objective, cfg):
    """The attack loop of trades.py (trades_loss), mart.py (mart_loss) and lbgat.py (lbgat_loss), the same lines in
    all three but for the objective: eval mode, x' = x + 0.001 randn(x.shape), then sign steps on x' itself, each
    followed by min/max onto the eps-box around x and a clamp into [0, 1]; train mode again afterwards."""
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape).detach()
    for _ in range(cfg.attack_steps):
        x_adv.requires_grad_()
        (grad,) = torch.autograd.grad(objective(model(x_adv)), [x_adv])
        x_adv = x_adv.detach() + cfg.step_size * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - cfg.eps), x + cfg.eps), 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0).detach()


def _official_kl_sum(model, x):
    """nn.KLDivLoss(size_average=False)(log_softmax(logits'), softmax(model(x))) as the official attacks write it,
    model(x) recomputed at every call."""
    return lambda logits: F.kl_div(F.log_softmax(logits, dim=1), F.softmax(model(x), dim=1), reduction="sum")


def _official_at_step(net, teacher, x_natural, y, optimizer, cfg):
    """ndb796/Pytorch-Adversarial-Training-CIFAR, pgd_adversarial_training.py: train() zeroes the gradients, then
    LinfPGDAttack.perturb on the train-mode net (x + U(-eps, eps), not clamped before its first gradient; sign steps
    on the batch-mean CE, min/max onto the box, clamp), then CE(net(x'), y), backward, step."""
    optimizer.zero_grad()
    x = x_natural.detach() + torch.zeros_like(x_natural).uniform_(-cfg.eps, cfg.eps)
    for _ in range(cfg.attack_steps):
        x.requires_grad_()
        (grad,) = torch.autograd.grad(F.cross_entropy(net(x), y), [x])
        x = x.detach() + cfg.step_size * torch.sign(grad.detach())
        x = torch.clamp(torch.min(torch.max(x, x_natural - cfg.eps), x_natural + cfg.eps), 0, 1)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()
    return x, loss


def _official_trades_step(model, teacher, x, y, optimizer, cfg):
    """yaodongyu/TRADES, trades.py, trades_loss (as train_trades_cifar10.py's train() calls it): the KL attack, then
    in train mode logits = model(x), and (1 / B) KL-sum(log_softmax(model(x')), softmax(model(x))): three forwards."""
    x_adv = _official_attack(model, x, _official_kl_sum(model, x), cfg)
    optimizer.zero_grad()
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    kl_sum = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")
    loss = loss_natural + cfg.trades_beta * ((1.0 / len(x)) * kl_sum)
    loss.backward()
    optimizer.step()
    return x_adv, loss


def _official_mart_step(model, teacher, x, y, optimizer, cfg):
    """YisenWang/MART, mart.py, mart_loss: the CE attack (batch mean), then in train mode model(x), model(x'); the
    boosted CE on x' (the most likely wrong class from argsort) and the KL weighted by 1.0000001 - p_y(x)."""
    x_adv = _official_attack(model, x, lambda logits: F.cross_entropy(logits, y), cfg)
    optimizer.zero_grad()
    logits, logits_adv = model(x), model(x_adv)
    adv_probs, nat_probs = F.softmax(logits_adv, dim=1), F.softmax(logits, dim=1)
    top = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top[:, -1] == y, top[:, -2], top[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze()
    kl_rows = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)
    loss = loss_adv + cfg.trades_beta * ((1.0 / len(x)) * torch.sum(kl_rows * (1.0000001 - true_probs)))
    loss.backward()
    optimizer.step()
    return x_adv, loss


def _official_lbgat_step(model, teacher, x, y, optimizer, cfg):
    """dvlab-research/LBGAT, lbgat.py, lbgat_loss: the KL attack, then in train mode out_adv = model(x'), out_natural =
    model(x), out = teacher(x); MSE(out_adv, out) + CE(out, y) + beta (1 / B) KL-sum(out_adv, out_natural)."""
    x_adv = _official_attack(model, x, _official_kl_sum(model, x), cfg)
    optimizer.zero_grad()
    out_adv, out_natural, out = model(x_adv), model(x), teacher(x)
    kl_sum = F.kl_div(F.log_softmax(out_adv, dim=1), F.softmax(out_natural, dim=1), reduction="sum")
    loss = F.mse_loss(out_adv, out) + F.cross_entropy(out, y) + cfg.trades_beta * ((1.0 / out.size(0)) * kl_sum)
    loss.backward()
    optimizer.step()
    return x_adv, loss


def _steps_equal_the_official_ones(name, official_step):
    """Two SGD steps of baselines.py's method through Run.train_step (its attack, Trainee, the SGD optimiser Run
    builds, the method's recipe) against two steps of `official_step` on a copy, in float64, from the same weights and
    RNG state: x', the loss, every parameter, BN running statistic and momentum buffer (the teacher's too) to 1e-10."""
    cfg = baselines.setup(baseline_args("--method", name, "--amp", "off", "--device", "cpu"))[0]
    cfg = dataclasses.replace(cfg, attack_steps=3)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the official torch.randn(x.shape) then draws x's dtype, as in fp32
    try:
        model, extra = _bn_randomised(0), _bn_randomised(1) if name == "lbgat" else nn.Module()
        twin, twin_extra = copy.deepcopy(model), copy.deepcopy(extra)
        method, seen = baselines.METHODS[name], []

        def attack(*args):
            x, x_adv = method.attack(*args)
            seen.append(x_adv)
            return x, x_adv

        ours, theirs = (
            torch.optim.SGD([*m.parameters(), *e.parameters()], cfg.lr, cfg.momentum, weight_decay=cfg.weight_decay)
            for m, e in ((model, extra), (twin, twin_extra))
        )
        run = types.SimpleNamespace(cfg=cfg, method=method._replace(attack=attack), fwd=model, extra=extra, rank=0)
        run.autocast = functools.partial(torch.autocast, "cpu", enabled=False)
        run.scaler = torch.amp.GradScaler("cpu", enabled=False)
        run.world, run.optimizer, run.trainee = 1, ours, arat.Trainee(model, extra, method.loss)
        for step in range(2):
            x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,))
            x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.0, 1.0  # pixels at the box edges: an unclamped start leaves [0, 1] there
            torch.manual_seed(10 + step)
            loss = arat.Run.train_step(run, x, y, 0.5, 0.5)["loss"]
            torch.manual_seed(10 + step)
            x_adv, ref_loss = official_step(twin, twin_extra, x, y, theirs, cfg)
            assert torch.allclose(seen[-1], x_adv, rtol=0, atol=1e-10), step
            assert torch.allclose(loss, ref_loss, rtol=0, atol=1e-10), step
        pairs = zip([*model.parameters(), *extra.parameters()], [*twin.parameters(), *twin_extra.parameters()])
        for a, b in pairs:
            assert torch.allclose(a, b, rtol=0, atol=1e-10)
            assert torch.allclose(ours.state[a]["momentum_buffer"], theirs.state[b]["momentum_buffer"], 0, 1e-10)
        for m, t in ((model, twin), (extra, twin_extra)):
            a, b = buffers(m), buffers(t)
            assert a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), 0, 1e-10) for k in a)
    finally:
        torch.set_default_dtype(default)


def test_at_steps_equal_the_official_ones_with_the_random_start_unclamped():
    _steps_equal_the_official_ones("at", _official_at_step)


def test_trades_steps_equal_the_official_ones_with_three_train_mode_forwards():
    _steps_equal_the_official_ones("trades", _official_trades_step)


def test_mart_steps_equal_the_official_ones():
    _steps_equal_the_official_ones("mart", _official_mart_step)


def test_lbgat_steps_equal_the_official_ones_with_the_student_clean_forward_at_beta_0():
    assert baselines.setup(baseline_args("--method", "lbgat", "--recipe", "arat"))[0].trades_beta == 0
    _steps_equal_the_official_ones("lbgat", _official_lbgat_step)


def test_recipes_are_each_methods_own_and_flags_override_them():
    def resolved(*flags):
        return baselines.setup(baseline_args(*flags))[0]

    fields = ("epochs", "lr", "lr_drops", "weight_decay", "eps", "step_size", "attack_steps", "trades_beta")
    trades = resolved("--method", "trades")
    assert tuple(getattr(trades, f) for f in fields) == (76, 0.1, "74,89,99", 2e-4, 0.031, 0.007, 10, 6.0)
    assert (
        resolved("--method", "mart").trades_beta == 5.0
        and resolved("--method", "mart", "--arch", "wrn34").trades_beta == 6.0
    )
    at = resolved("--method", "at")
    assert (at.epochs, at.lr_drops, at.attack_steps, at.attack_mode, at.split_bn) == (150, "50,100", 7, "train", False)
    like = resolved("--method", "trades", "--recipe", "arat")
    assert tuple(getattr(like, f) for f in fields[:7]) == (100, 0.1, "75,90", 5e-4, 8 / 255, 2 / 255, 10)
    assert like.out.endswith("trades-arat-recipe-s0") and resolved("--method", "at", "--epochs", "3").epochs == 3
    assert resolved("--method", "lbgat", "--dataset", "imagenette").lr == 0.01  # Table 4
    assert (resolved("--method", "at", "--norm", "l2").eps, resolved("--method", "trades", "--norm", "l2").eps) == (
        0.5,
        0.5,
    )
    asym = resolved("--method", "asym-trades")
    assert (asym.split_bn, asym.auto_balance, asym.predictor, asym.gamma, asym.epochs) == (True, True, False, 0, 100)
    assert all(resolved("--method", m).eval_eps == 8 / 255 for m in baselines.METHODS)  # AR-AT's evaluation protocol


def _epoch_lrs(cfg):
    """The lr of epochs 1..N: the lambda Run's scheduler applies to the resolved config."""
    return [cfg.lr * arat.lr_schedule(cfg)(epoch) for epoch in range(cfg.epochs)]


def _stepped(lr, epoch, thresholds):
    """An official adjust_learning_rate of the "if epoch >= t: lr = base * 0.1 ** k" kind, 1-based epochs."""
    return lr * 0.1 ** sum(epoch >= t for t in thresholds)


def test_each_recipe_gives_the_lr_of_every_epoch_of_its_official_script():
    # written from each official script, for its epochs 1..N
    official = {
        # MadryLab robustness's CIFAR defaults: StepLR(step_size=50, gamma=0.1) over 150 epochs
        ("at", "resnet18"): [_stepped(0.1, e, (51, 101)) for e in range(1, 151)],
        # yaodongyu/TRADES, train_trades_cifar10.py: 76 epochs, adjust_learning_rate (75, 90, 100)
        ("trades", "wrn34"): [_stepped(0.1, e, (75, 90, 100)) for e in range(1, 77)],
        # YisenWang/MART, train_resnet.py: 120 epochs at 0.01; train_wideresnet.py: 90 at 0.1 (75, 90, 100)
        ("mart", "resnet18"): [_stepped(0.01, e, (75, 90, 100)) for e in range(1, 121)],
        ("mart", "wrn34"): [_stepped(0.1, e, (75, 90, 100)) for e in range(1, 91)],
        # dvlab-research/LBGAT, train_lbgat_cifar100.py: 100 epochs, epoch 1 at 0.02, then (76, 91, 101)
        ("lbgat", "wrn34"): [0.02 if e == 1 else _stepped(0.1, e, (76, 91, 101)) for e in range(1, 101)],
    }
    for (method, arch), lrs in official.items():
        assert _epoch_lrs(baselines.setup(baseline_args("--method", method, "--arch", arch))[0]) == pytest.approx(
            lrs, rel=1e-12
        ), (method, arch)
    fields = ("epochs", "weight_decay", "trades_beta", "eps", "step_size", "attack_steps")
    values = {  # the same scripts' other defaults (LBGAT's beta: sh/train_lbgat0_cifar100.sh)
        ("mart", "resnet18"): (120, 3.5e-3, 5.0, 0.031, 0.007, 10),
        ("mart", "wrn34"): (90, 7e-4, 6.0, 0.031, 0.007, 10),
        ("lbgat", "resnet18"): (100, 2e-4, 0.0, 0.031, 0.007, 10),
        ("trades", "resnet18"): (76, 2e-4, 6.0, 0.031, 0.007, 10),
    }
    for (method, arch), expected in values.items():
        cfg = baselines.setup(baseline_args("--method", method, "--arch", arch))[0]
        assert tuple(getattr(cfg, f) for f in fields) == expected, (method, arch)
    for method, beta in {"trades": 6.0, "mart": 5.0, "lbgat": 0.0}.items():  # --recipe arat keeps the method
        assert baselines.setup(baseline_args("--method", method, "--recipe", "arat"))[0].trades_beta == beta


def test_shorter_runs_drop_the_lr_at_the_same_fractions_and_keep_one_warm_up_epoch():
    at = baselines.setup(baseline_args("--method", "at", "--recipe", "arat", "--epochs", "10"))[0]
    assert _epoch_lrs(at) == _epoch_lrs(arat.resolve(arat.parse_args(["--epochs", "10"])))
    assert _epoch_lrs(at) == pytest.approx([0.1] * 8 + [0.01, 0.001], rel=1e-12)
    lbgat = baselines.setup(baseline_args("--method", "lbgat", "--epochs", "10"))[0]
    assert _epoch_lrs(lbgat) == pytest.approx([0.02] + [0.1] * 7 + [0.01, 0.001], rel=1e-12)
    assert baselines.setup(baseline_args("--method", "at", "--epochs", "15"))[0].lr_drops == "5,10"
    assert baselines.setup(baseline_args("--method", "at", "--lr-drops", "3"))[0].lr_drops == "3"  # given: kept


def test_lbgat_teacher_is_the_official_resnet18_cifar_with_layer2_at_stride_1():
    student = arat.build_model("resnet18", 10, split_bn=False)
    teacher = baselines.lbgat_teacher(student, None)
    sizes = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        teacher.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: sizes.__setitem__(n, o.shape[-1]))
    assert teacher(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert list(sizes.values()) == [32, 32, 16, 8]  # models/resnetcifar.py; arat.py's ResNet-18: 32/16/8/4
    assert sum(p.numel() for p in teacher.parameters()) == 11_173_962
    assert not any(isinstance(m, arat.SplitBatchNorm2d) for m in teacher.modules())


def test_fp16_mart_and_at_attacks_scale_their_loss_and_take_full_steps():
    # the confident classifier of test_fp16_attack_gradients_do_not_vanish: unscaled fp16 input gradients are zeros
    model, x, y = confident_classifier()
    cfg = types.SimpleNamespace(eps=8 / 255, step_size=2 / 255, attack_steps=1, norm="linf", attack_mode="eval")
    for attack in (baselines.mart_attack, baselines.at_attack):
        with torch.autocast("cpu", dtype=torch.float16):
            _, x_adv = attack(model, None, x, y, cfg)
        assert (x_adv - x).abs().mean() > 1.5 / 255, attack.__name__  # a stalled step stays near its start


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--official-quirks"], "--official-quirks: reproduces AR-AT's released code; arat.py only"),
        (["--gamma", "30"], "--gamma: an AR-AT flag, which --method trades does not take"),
        (["--variant", "v1"], "--variant: an AR-AT flag"),
        (["--no-split-bn", "--method", "asym-trades"], "--no-split-bn: an AR-AT flag"),
        (["--predictor"], "--predictor: an AR-AT flag"),
        (["--layers", "layer4"], "--layers: an AR-AT flag"),
        (["--no-stop-grad"], "--no-stop-grad: an AR-AT flag"),
        (["--method", "mart", "--beta", "0.5"], "--beta: an AR-AT flag, which --method mart does not take"),
    ],
)
def test_ar_at_only_flags_and_official_quirks_are_refused_by_baselines(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        arat.main(baseline_args(*flags), baselines.setup, "baselines.py")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"baselines.py: error: {message}") and err.count("\n") == 1
    cfg = baselines.setup(baseline_args("--method", "asym-trades", "--no-auto-balance", "--alpha", "0.5"))[0]
    assert (cfg.alpha, cfg.beta) == (0.5, 1.0)  # Asym-TRADES weighs alpha and beta: they are its flags


def test_baselines_help_describes_baselines_py():
    out = subprocess.run([sys.executable, "baselines.py", "--help"], capture_output=True, text=True, check=True).stdout
    assert baselines.__doc__.split("\n\n")[0] in out and arat.__doc__.split("\n\n")[0] not in out


@pytest.mark.parametrize("method", list(baselines.METHODS))
def test_each_baseline_trains_two_steps_and_writes_all_outputs(method, tiny, tmp_path):
    args = baseline_args("--dataset", str(tiny), "--out", str(tmp_path / method), *FAST.split(), "--method", method)
    metrics = arat.main(dataclasses.replace(args, max_steps=2), baselines.setup, "baselines.py")
    out = tmp_path / method
    assert {p.name for p in out.iterdir()} == {"config.json", "log.jsonl", "last.pt", "metrics.json"}
    assert metrics["method"] == method and read_log(out)[-1]["step"] == 2 and 0 <= metrics["pgd3_acc"] <= 100
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert (len(ckpt["extra"]) > 0) == (method == "lbgat")  # LBGAT's teacher is saved with the model
    assert ckpt["config"]["method"] == method


@pytest.mark.parametrize("method", ["trades", "asym-trades"])
def test_baseline_logs_name_each_methods_own_terms_and_measure_grad_sim(method, tiny, tmp_path):
    flags = ("--method", method, "--grad-sim-every", "1", "--max-steps", "2")
    arat.main(baseline_args("--dataset", str(tiny), "--out", str(tmp_path), *FAST.split(), *flags), baselines.setup)
    rec = read_log(tmp_path)[-1]
    own = {"trades": {"ce_clean", "kl"}, "asym-trades": {"ce_adv", "ce_clean", "kl"}}[method]
    assert own <= rec.keys() and "inv" not in rec and -1 <= rec["grad_sim"] <= 1  # Fig. 11: TRADES's own two terms
    weights = {"alpha", "beta", "balance_acc"} & rec.keys()  # only Asym-TRADES weighs its CE terms by Eq. 8
    assert weights == ({"alpha", "beta", "balance_acc"} if method == "asym-trades" else set())


def test_a_baselines_checkpoint_evaluates_with_arat_eval_only(tiny, tmp_path):
    args = baseline_args("--dataset", str(tiny), "--out", str(tmp_path / "run"), *FAST.split(), "--method", "mart")
    trained = arat.main(dataclasses.replace(args, max_steps=2), baselines.setup, "baselines.py")
    evaluated = arat.main(
        arat.parse_args(["--eval-only", "--checkpoint", str(tmp_path / "run" / "last.pt"), *FAST.split()])
    )
    assert (evaluated["clean_acc"], evaluated["pgd3_acc"]) == (trained["clean_acc"], trained["pgd3_acc"])


def test_an_unknown_method_exits_2_with_a_one_line_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        arat.main(baseline_args("--method", "fgsm"), baselines.setup, "baselines.py")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("baselines.py: error: --method: invalid choice 'fgsm'")


# ------------------------------------------------------------------------------------------------------- speed, scale


def test_benchmark_prints_its_timing_line_last_and_writes_nothing(tiny, tmp_path, capsys):
    result = arat.main(cli(tiny, tmp_path / "bench", "--benchmark", "2"))
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"benchmark: method=v3 step_s=[\d.]+ img_s=[\d.]+ peak_mem_mb=\d+", lines[-1]), lines[-1]
    assert "bf16" in lines[-2] and "amp=off" in lines[-2]  # the CPU's bf16 capability and the precision it ran
    assert re.fullmatch(r"benchmark: step 4/4 \| [\d.]+ it/s \| ETA 0:00:00", lines[-3]), lines[-3]
    assert not (tmp_path / "bench").exists() and len(result["times"]) == 4  # two warm-up steps, two timed


def test_compile_keeps_feature_capture_and_saves_uncompiled_weights(tiny, tmp_path, monkeypatch):
    arat.main(cli(tiny, tmp_path / "eager", "--epochs", "1", "--max-steps", "2"))
    backend = functools.partial(torch.compile, backend="aot_eager")  # the same capture; inductor's code takes minutes
    monkeypatch.setattr(torch, "compile", backend)
    arat.main(cli(tiny, tmp_path / "compiled", "--epochs", "1", "--max-steps", "2", "--compile"))
    eager, compiled = read_log(tmp_path / "eager")[0], read_log(tmp_path / "compiled")[0]
    assert compiled["inv"] == pytest.approx(eager["inv"], rel=1e-4) and compiled["loss"] == pytest.approx(
        eager["loss"], rel=1e-4
    )
    a, b = weights(tmp_path / "eager" / "last.pt"), weights(tmp_path / "compiled" / "last.pt")
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-5) for k in a)


LAUNCH = """
import sys

import torch
import torchvision.datasets.cifar

torchvision.datasets.cifar.check_integrity = lambda *args, **kw: True  # the test's files stand in for the release
torch.set_default_dtype(torch.float64)  # in fp32, sign-PGD turns rounding into whole steps at a few pixels
import arat

train = arat.Run.train


def train_and_keep(self):  # every rank's weights after training
    train(self)
    torch.save(self.model.state_dict(), self.out / f"rank{self.rank}.pt")


arat.Run.train = train_and_keep
arat.main(arat.parse_args(sys.argv[1:]))
"""


def test_torchrun_two_processes_resumed_mid_epoch_train_as_one_process_does(cifar, tmp_path):
    launch = tmp_path / "launch.py"
    launch.write_text(LAUNCH)
    flags = [*FAST.split(), "--dataset", "cifar10", "--data-dir", str(cifar), "--no-download", "--eval-steps", "1"]
    flags += ["--batch-size", "16", "--attack-steps", "1", "--epochs", "2"]  # 2 global batches of 16 per epoch
    env = os.environ | {"PYTHONPATH": os.path.dirname(arat.__file__)}

    def run(out, processes, *more):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command = [*(torchrun if processes > 1 else [sys.executable]), str(launch), *flags, "--out", str(out), *more]
        threads = {"OMP_NUM_THREADS": str(max(1, min(2, os.cpu_count() or 1) // processes))}  # one core per process
        done = subprocess.run(command, env=env | threads, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    one, two = tmp_path / "one", tmp_path / "two"
    run(one, 1, "--max-steps", "3")  # into epoch 2: its auto-balance, evaluation and checkpoint included
    assert run(two, 2, "--max-steps", "1").count("arat.py: rank") == 2  # each rank finished; stopped inside epoch 1
    assert run(two, 2, "--max-steps", "3", "--resume").count("arat.py: rank") == 2
    assert {p.name for p in two.iterdir()} == {
        "config.json",
        "log.jsonl",
        "last.pt",
        "metrics.json",
        "rank0.pt",
        "rank1.pt",
    }
    rank0, rank1, single = (torch.load(path) for path in (two / "rank0.pt", two / "rank1.pt", one / "rank0.pt"))
    assert same_tensors(rank0, rank1)  # DDP keeps the processes' weights identical
    assert all(torch.allclose(rank0[k].double(), single[k].double(), rtol=1e-7, atol=1e-9) for k in single)
    assert [r["step"] for r in read_log(two)] == [2, 3] and read_log(two)[-1]["clean_acc"] == read_log(one)[-1][
        "clean_acc"
    ]


# ------------------------------------------------------------------------------------------------ CUDA, README's code

with warnings.catch_warnings():  # the layout has no pytest config file to register the marker; `-m cuda` selects by
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)  # name all the same
    CUDA_GROUP = pytest.mark.cuda
NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA group: torch.cuda.is_available() is False")


def on_cuda(test):
    """The CUDA group (`pytest -m cuda`): what users run on GPUs, skipped with one line where there is none."""
    return CUDA_GROUP(NO_GPU(test))


@pytest.fixture
def no_tf32():
    """Plain fp32 on the GPU, restored afterwards: cuDNN convolutions use TF32 (10-bit mantissa) by default."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def random_starts_from_the_cpu(monkeypatch):
    """PGD's uniform random starts drawn from the CPU generator on every device, so that the same seed gives the same
    start on the CPU and on the GPU (their generators differ); returns the devices that drew, to show it was used."""
    uniform, drawn = torch.Tensor.uniform_, []

    def from_the_cpu(self, *args, **kw):
        drawn.append(self.device.type)
        return self.copy_(uniform(torch.empty(self.shape, dtype=self.dtype), *args, **kw))

    monkeypatch.setattr(torch.Tensor, "uniform_", from_the_cpu)
    return drawn


def gpu_run(data, out, *flags):
    """A Run built as `main` builds it: arat.py's, or baselines.py's when --method is given."""
    argv = ["--dataset", str(data), "--out", str(out), *FAST.split(), *flags]
    if "--method" in flags:
        return arat.Run(*baselines.setup(arat.parse_args(argv, config=baselines.BaselineConfig, prog="baselines.py")))
    return arat.Run(arat.resolve(arat.parse_args(argv)))


def tinted_batch(n, size=16, seed=0):
    """n noisy squares of the first three tints of COLOURS: an easy task, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    colours = torch.tensor(COLOURS[:3], dtype=torch.float32) / 255
    return (colours[y][:, :, None, None] + 0.15 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1), y


def cpu64(state):
    return {k: v.detach().cpu().double() for k, v in state.items()}


def state_of(run):
    """Parameters and buffers of the model and the method's modules, on the CPU, in fp64."""
    return cpu64(run.model.state_dict()) | cpu64({f"extra.{k}": v for k, v in run.extra.state_dict().items()})


def relative_distance(a, b, reference, only=""):
    """||a - b|| / ||a - reference|| over the floating-point tensors whose names contain `only`: how far b is from a,
    against how far a moved from where both started."""
    keys = [k for k in a if a[k].is_floating_point() and only in k]
    diff = sum((a[k] - b[k]).square().sum() for k in keys).sqrt()
    return (diff / sum((a[k] - reference[k]).square().sum() for k in keys).sqrt()).item()


def assert_same_step(terms, other_terms, state, other_state, start):
    """Two fp32 training steps from the same weights, batch and random start, whose kernels sum in different orders
    (CPU and GPU, or eager and compiled). The tolerances are about ten times what contiguous and channels-last
    convolutions give on a CPU with one attack step: the loss terms and the BN statistics, forward quantities, agree to
    1.4e-5 of their size and 2e-4 of their update; the weights to 2% of their update (6% in the first layers), since
    the gradient of a weight that feeds a BatchNorm is the small difference of large terms. A step that computes
    something else (another BN branch, a lost term) shows in the loss terms, far beyond 1e-4. More attack steps would
    let sign-PGD amplify the rounding: a flipped sign at a near-zero input gradient moves that pixel a whole step."""
    for k in ("loss", "ce_adv", "ce_clean", "inv"):
        assert other_terms[k] == pytest.approx(terms[k], rel=1e-4), k
    assert_same_update(state, other_state, start)


def assert_same_update(state, other_state, start):
    assert relative_distance(state, other_state, start, only="running_") < 2e-3
    assert relative_distance(state, other_state, start) < 0.2
    assert all(torch.equal(state[k], other_state[k]) for k in state if k.endswith("num_batches_tracked"))


@on_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["arat", "trades"])
def test_cuda_training_steps_lower_the_loss_of_a_fixed_batch_in_bf16_and_in_fp16_with_grad_scaling(
    method, amp, tiny, tmp_path
):
    flags = ["--device", "cuda", "--amp", amp] + (["--method", method] if method != "arat" else [])
    run = gpu_run(tiny, tmp_path / "run", *flags)
    dtypes = set()
    run.model.fc.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    x, y = (t.cuda() for t in tinted_batch(24))
    losses = [run.train_step(x, y, 0.5, 0.5)["loss"].item() for _ in range(20)]
    assert dtypes == {torch.bfloat16 if amp == "bf16" else torch.float16}  # every pass ran under autocast
    assert run.scaler.is_enabled() == (amp == "fp16")  # loss scaling for fp16 only: bf16 has fp32's range
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


@on_cuda
def test_cuda_fp32_step_matches_the_cpu_step_on_the_same_weights_and_batch(tiny, tmp_path, no_tf32, monkeypatch):
    flags = ["--attack-steps", "1"]  # see assert_same_step
    runs = {device: gpu_run(tiny, tmp_path / device, "--device", device, *flags) for device in ("cpu", "cuda")}
    runs["cuda"].model.load_state_dict(runs["cpu"].model.state_dict())
    runs["cuda"].extra.load_state_dict(runs["cpu"].extra.state_dict())
    drawn, start, (x, y) = random_starts_from_the_cpu(monkeypatch), state_of(runs["cpu"]), tinted_batch(24)
    terms = {}
    for device, run in runs.items():
        torch.manual_seed(1)
        terms[device] = {k: v.item() for k, v in run.train_step(x.to(device), y.to(device), 0.5, 0.5).items()}
    assert drawn == ["cpu", "cuda"]  # one random start each, the same numbers
    assert_same_step(terms["cpu"], terms["cuda"], state_of(runs["cpu"]), state_of(runs["cuda"]), start)


@on_cuda
def test_cuda_tensor_images_crop_and_flip_exactly_as_on_the_cpu(cifar):
    cfg = arat.resolve(arat.Config(dataset="cifar10", data_dir=str(cifar), download=False, workers=0, device="cpu"))
    cpu, gpu = (arat.load_data(cfg, torch.device(device))[0] for device in ("cpu", "cuda"))
    order = [torch.tensor([7, 3, 39, 0, 12]), torch.arange(20, 40), torch.tensor([5])]
    for seed in (0, 1, 123):
        for (x, y), (gx, gy) in zip(cpu.batches(order, seed), gpu.batches(order, seed), strict=True):
            assert gx.is_cuda and torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)
    plain, augmented = next(cpu.batches([torch.arange(40)])), next(cpu.batches([torch.arange(40)], 0))
    assert not torch.equal(plain[0], augmented[0])  # the seeded passes were augmented


def export_labelling_the_test_images(cifar, path):
    """An exported ResNet-18 (one BN set, fresh weights, BN statistics of the test images so that its logits are
    moderate), and CIFAR-10 test labels set to its own predictions: every test image is classified correctly, so PGD
    and AutoAttack have all of them to attack."""
    torch.manual_seed(0)
    model = arat.build_model("resnet18", 10, split_bn=False)
    test = cifar / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(test.read_bytes())
    x = torch.as_tensor(entry["data"]).view(-1, 3, 32, 32) / 255
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # running statistics: the exact average of what they see
    with torch.no_grad():
        model.train()(x)
        entry["labels"] = model.eval()(x).argmax(1).tolist()
    torch.save(model.state_dict(), path)
    test.write_bytes(pickle.dumps(entry))
    return path


@on_cuda
def test_cuda_clean_pgd20_and_autoattack_evaluation_agree_with_the_cpu(cifar, tmp_path, no_tf32, monkeypatch):
    model = export_labelling_the_test_images(cifar, tmp_path / "model.pt")
    flags = [*FAST.split(), "--dataset", "cifar10", "--data-dir", str(cifar), "--no-download", "--eval-n", "16"]
    flags += ["--eval-steps", "20", "--eval-only", "--checkpoint", str(model)]
    gpu = arat.main(arat.parse_args([*flags, "--device", "cuda", "--aa-n", "16", "--out", str(tmp_path / "aa")]))
    assert gpu["clean_acc"] == 100 and 0 <= gpu["aa_acc"] <= gpu["pgd20_acc"] <= 100
    assert gpu["n_aa"] == 16 and "apgd-ce" in gpu["autoattack"]["after"]
    assert "robust accuracy after APGD-CE" in (tmp_path / "aa" / "autoattack.log").read_text()
    drawn = random_starts_from_the_cpu(monkeypatch)  # PGD-20 from the same random starts on both devices
    cpu, gpu = (
        arat.main(arat.parse_args([*flags, "--device", d, "--out", str(tmp_path / d)])) for d in ("cpu", "cuda")
    )
    assert set(drawn) == {"cpu", "cuda"} and cpu["clean_acc"] == gpu["clean_acc"] == 100
    assert abs(cpu["pgd20_acc"] - gpu["pgd20_acc"]) <= 100 / 16  # one image: a sign flip at a near-zero gradient


@on_cuda
@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_cuda_checkpoints_resume_and_evaluate_on_the_other_device(first, then, cifar, tmp_path, no_tf32, monkeypatch):
    random_starts_from_the_cpu(monkeypatch)  # the same training on both devices, up to rounding
    flags = ["--data-dir", str(cifar), "--no-download", "--eval-n", "16", "--attack-steps", "1"]

    def train(out, device, steps, *more):
        return arat.main(cli("cifar10", out, *flags, "--device", device, "--max-steps", str(steps), *more))

    train(tmp_path / "straight", first, 2)
    train(tmp_path / "moved", first, 1)
    ckpt = torch.load(tmp_path / "moved" / "last.pt", weights_only=False)  # no map_location: where it was written
    assert {t.device.type for t in ckpt["model"].values()} == {first} and ckpt["step"] == 1
    resumed = train(tmp_path / "moved", then, 2, "--resume")
    assert resumed["steps"] == 2
    straight, moved = (cpu64(weights(tmp_path / run / "last.pt")) for run in ("straight", "moved"))
    assert_same_update(straight, moved, cpu64(ckpt["model"]))  # step 2 on another device: see assert_same_step
    flags += ["--eval-only", "--checkpoint", str(tmp_path / "moved" / "last.pt"), "--device", first]
    assert arat.main(arat.parse_args([*FAST.split(), *flags]))["clean_acc"] == resumed["clean_acc"]


@on_cuda
def test_cuda_compile_trains_as_eager_does_and_keeps_the_model_uncompiled(tiny, tmp_path, no_tf32):
    runs = {
        way: gpu_run(tiny, tmp_path / way, "--device", "cuda", "--attack-steps", "1", *more)
        for way, more in (("eager", []), ("compiled", ["--compile"]))
    }
    runs["compiled"].model.load_state_dict(runs["eager"].model.state_dict())
    runs["compiled"].extra.load_state_dict(runs["eager"].extra.state_dict())
    start, (x, y), terms = state_of(runs["eager"]), (t.cuda() for t in tinted_batch(24)), {}
    for way, run in runs.items():  # inductor on the GPU: the kernels users get; the first step compiles
        torch.manual_seed(1)
        terms[way] = {k: v.item() for k, v in run.train_step(x, y, 0.5, 0.5).items()}
    assert_same_step(terms["eager"], terms["compiled"], state_of(runs["eager"]), state_of(runs["compiled"]), start)
    assert runs["compiled"].model.state_dict().keys() == runs["eager"].model.state_dict().keys()  # what is saved


@on_cuda
def test_cuda_benchmark_prints_its_line_with_the_gpu_and_its_peak_memory(tiny, tmp_path, capsys):
    result = arat.main(cli(tiny, tmp_path / "bench", "--device", "cuda", "--amp", "bf16", "--benchmark", "3"))
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"benchmark: method=v3 step_s=[\d.]+ img_s=[\d.]+ peak_mem_mb=\d+", lines[-1]), lines[-1]
    assert torch.cuda.get_device_name() in lines[-2] and "amp=bf16" in lines[-2]
    weights_mb = sum(p.numel() * 4 for p in arat.build_model("resnet18", 3).parameters()) / 2**20
    assert weights_mb < result["peak_mem_mb"] <= torch.cuda.get_device_properties(0).total_memory / 2**20
    assert not (tmp_path / "bench").exists() and len(result["times"]) == 5


README = os.path.join(os.path.dirname(arat.__file__), "README.md")


def readme_section(title):
    text = open(README).read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : None if end == -1 else end]


def test_readme_snippet_runs_as_written_on_a_torchvision_cnn():
    import torchvision

    blocks = re.findall(r"```python\n(.*?)```", readme_section("Using AR-AT in another project"), re.S)
    assert blocks
    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    space = {"my_bn_cnn": torchvision.models.resnet18(num_classes=5), "x": x, "y": y, "alpha": 0.6, "beta": 0.4}
    space["gamma"] = 30.0  # what the user's code provides; the snippet imports the rest
    for block in blocks:
        exec(block, space)
    model, inv = space["model"], space["inv"]
    assert torch.isfinite(space["loss"]) and inv > 0
    splits = [m for m in model.modules() if isinstance(m, arat.SplitBatchNorm2d)]
    aux, main = ([p for m in splits for p in getattr(m, branch).parameters()] for branch in ("aux", "main"))
    grads = torch.autograd.grad(inv, aux + main, allow_unused=True)  # the invariance term alone
    assert all(g is None or not g.any() for g in grads[: len(aux)])  # stop-gradient: nothing reaches the aux BNs
    assert any(g is not None and g.any() for g in grads[len(aux) :])
    with torch.no_grad():
        logits = model.eval()(x)
        plain, reference = arat.merge_split_bn(model), torchvision.models.resnet18(num_classes=5)
        assert plain.state_dict().keys() == reference.state_dict().keys()
        reference.load_state_dict(plain.state_dict())
        assert torch.equal(reference.eval()(x), logits)


def readme_commands():
    """(line number, launcher, script, arguments) of every README command line that runs arat.py or baselines.py: in
    code blocks, and in backticks in prose and tables, where a table cell of flags alone (Table 17) continues the
    command given just before the table, and `...` in a table stands for the flags in its header."""
    commands, in_code, before_table, header = [], False, [], None
    for number, line in enumerate(open(README).read().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        row = line.startswith("|") and not in_code
        spans = [line] if in_code else re.findall(r"`([^`]+)`", line)
        if not row:
            header = None
        elif header is None:  # a table's first line
            header = [w for span in spans if span.startswith("--") for w in span.split()]
        for span in spans:
            words = span.split()
            if row and f"| `{span}` |" in line and span.startswith("--"):  # a cell of flags only
                words = before_table + words
            scripts = [i for i, w in enumerate(words) if w in ("arat.py", "baselines.py")]
            if not scripts or words[0] not in ("python", "torchrun"):
                continue
            stop = [i for i, w in enumerate(words) if w in ("|", "&&", ";", ">") or w.startswith("#")]
            args = words[scripts[0] + 1 : min(stop, default=len(words))]  # torchrun's own flags come before it
            args = [a for w in args for a in (header or [] if w == "..." else [w])]  # other placeholders are values
            commands.append((number, words[0], words[scripts[0]], args))
            if not row and not in_code:
                before_table = words
    return commands


def test_every_readme_command_line_parses_and_resolves(capsys):
    commands, broken = readme_commands(), []
    for number, _, script, args in commands:
        try:
            if script == "baselines.py":
                cfg = arat.parse_args(args, config=baselines.BaselineConfig, prog=script)
                check = baselines.setup
            else:
                cfg, check = arat.parse_args(args), arat.resolve
            if not cfg.eval_only:  # --eval-only would read its checkpoint
                check(cfg)
        except SystemExit as e:
            if e.code != 0 or "--help" not in args:
                broken.append(f"README.md:{number}: {script} {' '.join(args)}: {capsys.readouterr().err.strip()}")
        except arat.ConfigError as e:
            broken.append(f"README.md:{number}: {script} {' '.join(args)}: {e}")
    assert not broken, "\n".join(broken)
    kinds = {(launcher, script) for _, launcher, script, _ in commands}
    assert kinds == {
        (launcher, script) for launcher in ("python", "torchrun") for script in ("arat.py", "baselines.py")
    }
    assert len([args for *_, args in commands if "--layers" in args and "--variant" in args]) == 8  # Table 17
