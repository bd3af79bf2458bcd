"""AR-AT: Asymmetric Representation-regularized Adversarial Training, in one file.

Adversarial training plus an invariance loss between adversarial and clean latent features, made asymmetric
(stop-gradient on the clean side, a predictor MLP on the adversarial side, after SimSiam), and a split BatchNorm
(auxiliary BNs for clean inputs, used only in training): F. Waseda, C.-C. Chang, I. Echizen, Rethinking Invariance
Regularization in Adversarial Training to Improve Robustness-Accuracy Trade-off, ICLR 2025.

Paper -> code: Sec. 3.3 split BN -> SplitBatchNorm2d, convert_split_bn, bn_branch; Sec. 3.2 predictor h ->
make_predictor; Sec. 3.5 multi-layer invariance -> FeatureTap, InvarianceHead; Eq. 1 PGD -> pgd, arat_attack;
Eq. 5 (why stop-gradient) -> invariance_loss; Eqs. 3-7 (L_V0..L_V3) -> VARIANTS, arat_loss; Eq. 8 auto-balance ->
auto_balance; Table 17 Grad-sim -> gradient_similarity.

    python arat.py --dataset cifar10 --arch wrn34 --gamma 100     # Table 3: 90.89 clean / 50.77 AutoAttack
    python arat.py --eval-only --checkpoint runs/cifar10-resnet18-v3-s0/last.pt --aa-n 10000
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import difflib
import functools
import importlib.metadata
import itertools
import json
import logging
import math
import os
import pickle
import re
import resource
import signal
import statistics
import sys
import time
import typing
from fractions import Fraction
from pathlib import Path

import PIL.Image
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn
from torchvision import datasets
from torchvision import transforms as T

# ========================================================================================================= The method

# fmt: off
#          stop_grad predictor split_bn     (paper Table 17)
VARIANTS = {"v0": (False, False, False),  # Eq. 3, naive siamese invariance
            "v1": (True, False, False),  # Eq. 4, + stop-gradient
            "v2": (True, True, False),  # Eq. 6, + predictor h
            "v3": (True, True, True)}  # Eq. 7, + split BN: AR-AT
# arch: gamma, regularised layers (ReLU of these outputs, pooled; as released, see README), penultimate features
ARCHS = {"resnet18": (30.0, ("layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2"), "layer4"),
         "preact18": (30.0, ("layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2", "bn"), "bn"),
         "wrn34": (100.0, tuple(f"layer3.{b}.bn{i}" for b in range(5) for i in (1, 2)) + ("bn",), "bn")}
# fmt: on
THREATS = {"linf": (8 / 255, 2 / 255), "l2": (0.5, 0.125)}  # default (eps, step size): Sec. 4, Appendix E


class ConfigError(ValueError):
    """A bad flag or input: reported as one line and exit code 2, never a traceback."""


# ---------------------------------------------------------------------------------------------- Split BN (Sec. 3.3)


class SplitBatchNorm2d(nn.Module):
    """Two BNs around shared weights (Sec. 3.3): `main` for adversarial inputs, `aux` for clean inputs in training.

    Inference always uses `main`: the paper's model f_theta classifies clean and adversarial inputs with the same BNs.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.main, self.aux = bn, copy.deepcopy(bn)
        self.branch = "main"  # set only by `bn_branch`, for the duration of one forward pass

    def forward(self, x):
        return (self.aux if self.branch == "aux" else self.main)(x)


def convert_split_bn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d of any model by a SplitBatchNorm2d (both halves start as copies of it)."""
    names = [name for name, m in model.named_modules() if type(m) is nn.BatchNorm2d]
    if not names:  # SyncBatchNorm, FrozenBatchNorm2d or no BN at all: a silently unsplit model would not be AR-AT
        raise ValueError(f"convert_split_bn: {type(model).__name__} has no nn.BatchNorm2d to split")
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SplitBatchNorm2d(model.get_submodule(name)))
    return model


def merge_split_bn(model: nn.Module) -> nn.Module:
    """The inference model: each SplitBatchNorm2d replaced by its main BN (shares the tensors; deep-copy to detach)."""
    for name in [name for name, m in model.named_modules() if isinstance(m, SplitBatchNorm2d)]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, model.get_submodule(name).main)
    return model


@contextlib.contextmanager
def bn_branch(model: nn.Module, branch: str):
    """Route the forward passes inside the block through the "aux" (clean) or "main" (adversarial) BNs."""
    splits = [m for m in model.modules() if isinstance(m, SplitBatchNorm2d)]
    for m in splits:
        m.branch = branch
    try:
        yield model
    finally:
        for m in splits:
            m.branch = "main"


@contextlib.contextmanager
def train_mode(model: nn.Module, training: bool):
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


# -------------------------------------------------------------------------------------------------------- Models


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation block of the CIFAR ResNet-18 (He et al., 2016a)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al., 2016b), also WRN's: the 1x1 shortcut reads the activated input."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv3x3(cout, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        a = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(a)
        return self.conv2(F.relu(self.bn2(self.conv1(a)))) + shortcut


class CifarResNet(nn.Module):
    """3x3 stem (no max-pool), stages of blocks (first of each later stage: stride 2 by default), avg-pool, linear.

    Post-activation nets put BN-ReLU after the stem; pre-activation nets (PreAct ResNet, WRN) put it before the pool.
    Inputs are in [0, 1]: there is no normalisation layer, as in the released code.
    """

    def __init__(self, block, stem, widths, depths, num_classes, preact, strides=None):
        super().__init__()
        self.conv1 = conv3x3(3, stem)
        self.bn1 = None if preact else nn.BatchNorm2d(stem)
        cin = stem
        strides = strides or [1] + [2] * (len(widths) - 1)  # the stride of each stage's first block
        for i, (width, depth, stride) in enumerate(zip(widths, depths, strides)):
            blocks = [block(cin if j == 0 else width, width, stride if j == 0 else 1) for j in range(depth)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = width
        self.stages = len(widths)
        self.bn = nn.BatchNorm2d(cin) if preact else None
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        if self.bn1 is not None:
            out = F.relu(self.bn1(out))
        for i in range(self.stages):
            out = getattr(self, f"layer{i + 1}")(out)
        if self.bn is not None:
            out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def build_model(arch: str, num_classes: int, split_bn: bool = True) -> nn.Module:
    _one_of("--arch", arch, list(ARCHS))
    if arch == "resnet18":  # 11,173,962 parameters with one BN set, 10 classes
        model = CifarResNet(BasicBlock, 64, (64, 128, 256, 512), (2, 2, 2, 2), num_classes, preact=False)
    elif arch == "preact18":
        model = CifarResNet(PreActBlock, 64, (64, 128, 256, 512), (2, 2, 2, 2), num_classes, preact=True)
    else:  # wrn34, WRN-34-10: 5 blocks per stage, widths 16 x 10; 46,160,474 parameters
        model = CifarResNet(PreActBlock, 16, (160, 320, 640), (5, 5, 5), num_classes, preact=True)
        for m in model.modules():  # WRN's initialisation (Zagoruyko & Komodakis), as released
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(2 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
    return convert_split_bn(model) if split_bn else model


# ------------------------------------------------------------------------ Predictors and features (Sec. 3.2, 3.5)


def make_predictor(dim: int) -> nn.Module:
    """h_l (Sec. 3.2): SimSiam's bottleneck MLP with hidden width d/4, applied to the adversarial feature only."""
    hidden = dim // 4
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dim))


class FeatureTap:
    """z_l = global-average-pool(ReLU(output of module l)) for named modules (Sec. 3.5), recorded only inside
    `with tap.capture() as z:`, so attack steps pay nothing. Hooks are registered once, before any torch.compile;
    `remove()` takes them out again."""

    def __init__(self, model: nn.Module, names):
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules or not name:
                valid = [n for n, m in modules.items() if n and not isinstance(m, (nn.Conv2d, nn.Linear))]
                close = ", ".join(difflib.get_close_matches(name, valid, n=3)) or "none close"
                raise ConfigError(f"--layers: the model has no module {name!r} ({close}); valid: {', '.join(valid)}")
        self.handles = [modules[n].register_forward_hook(functools.partial(self._hook, n)) for n in names]
        self.names, self.feats = tuple(names), None

    def _hook(self, name, module, inputs, output):
        if self.feats is None:
            return
        if name in self.feats:  # a module called twice per pass (a shared nn.ReLU) would keep only its last call
            raise RuntimeError(f"FeatureTap: module {name!r} ran twice in one pass; tap a module that runs once")
        z = F.relu(output)
        self.feats[name] = z.mean(tuple(range(2, z.dim()))) if z.dim() > 2 else z

    @contextlib.contextmanager
    def capture(self):
        self.feats = {}
        try:
            yield self.feats
        finally:
            self.feats = None

    def remove(self):
        for handle in self.handles:
            handle.remove()

    @torch.no_grad()
    def dims(self, model, image_size, released_probe=False):
        """Width of each tapped feature from one pass through the auxiliary BNs: in eval mode on zeros (no statistic
        moves), or as released, one standard-normal 1x3x32x32 batch in train mode (it moves their statistics once)."""
        like = next(model.parameters())
        x = torch.randn(1, 3, 32, 32).to(like) if released_probe else torch.zeros(2, 3, image_size, image_size).to(like)
        with train_mode(model, released_probe), bn_branch(model, "aux"), self.capture() as z:
            model(x)
        return [z[n].shape[1] for n in self.names]


class InvarianceHead(nn.Module):
    """What AR-AT trains besides the classifier (Sec. 3.5): a tap on each of the L regularised layers (--layers) and
    its predictor h_l (identity without --predictor)."""

    def __init__(self, model, cfg):
        super().__init__()
        self.tap = FeatureTap(model, cfg.layers.split(",") if cfg.layers else [])
        dims = self.tap.dims(model, cfg.image_size, cfg.official_quirks) if self.tap.names else []
        self.predictors = nn.ModuleList(make_predictor(d) if cfg.predictor else nn.Identity() for d in dims)


# ------------------------------------------------------------------------------------------------ Attack (Eq. 1)


def pgd(model, x, y, eps, step_size, steps, norm="linf", start="uniform", shard=(0, 1), objective=None):
    """Eq. 1 by projected gradient ascent on CE(f(x + delta), y) summed over the batch (or the baselines' `objective`
    of the logits and y): returns x' with ||x' - x|| <= eps and x' in [0, 1].

    Never modifies x (the released code added its random start to the caller's batch in place). `start` is delta_0:
    "uniform" in the ball clamped into [0, 1], "unclamped" (L-inf), "normal" 0.001 N(0, 1), or "none" (even if x lies
    outside [0, 1]). Gradients are taken with respect to delta only, the weights frozen meanwhile.
    With shard = (rank, world) the random start of the whole global batch is drawn and this process's rows kept, so
    that N processes under torchrun attack exactly as one process would.
    """
    view, (rank, world) = (-1, *[1] * (x.dim() - 1)), shard
    noise = torch.empty((len(x) * world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    objective = objective or functools.partial(F.cross_entropy, reduction="sum")
    if start == "none":
        delta = torch.zeros_like(x)
    elif start == "normal":
        delta = 0.001 * noise.normal_()[rank::world]
    elif norm == "linf":  # uniform in the box
        delta = noise.uniform_(-eps, eps)[rank::world]
        delta = delta if start == "unclamped" else (x + delta).clamp(0, 1) - x
    else:  # a uniform radius along a random direction
        delta, radius = noise.normal_(), torch.rand(len(noise), device=x.device).view(view)
        delta = (x + (delta * (eps * radius / delta.flatten(1).norm(dim=1).view(view)))[rank::world]).clamp(0, 1) - x
    # Under fp16 autocast the backward pass through confident logits underflows to exact zeros; scaling the loss
    # keeps the direction (sign / normalised gradient are scale-free), as GradScaler does for weight gradients.
    fp16 = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == torch.float16
    with frozen_weights(model):
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = objective(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss * (1024.0 if fp16 else 1.0), delta)
            if norm == "linf":
                delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
            else:  # a step along the normalised gradient, then back into the L2 ball
                delta = delta.detach() + step_size * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
                delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(view)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


@contextlib.contextmanager
def frozen_weights(model):
    """Attack steps need the input's gradient only: with the weights frozen, no weight gradient is computed (eager
    autograd skips them already; a torch.compile'd graph computes them all, a 1.4x slower step) and nothing lands in
    .grad."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in frozen:
            p.requires_grad_(True)


def arat_attack(model, head, x, y, cfg, shard=(0, 1)):
    """The training attack: PGD-10 on CE through the main BNs, in train mode as released, so the main BNs' running
    statistics absorb the attack's forward passes (L2, as released: eval mode). Returns the batch the clean branch
    trains on and x'."""
    start = "uniform"
    if cfg.official_quirks and cfg.norm == "linf":  # the released PGD added its random start to the batch in place:
        x = x + torch.empty_like(x).uniform_(-cfg.eps, cfg.eps)  # the clean branch trains on this unclamped point
        start = "none"  # and the attack starts there, its ball centred on it
    with train_mode(model, cfg.attack_mode == "train"):
        return x, pgd(model, x, y, cfg.eps, cfg.step_size, cfg.attack_steps, cfg.norm, start, shard)


# ---------------------------------------------------------------------------------------------- Losses (Eqs. 3-8)


def invariance_loss(z_adv, z, predictor, stop_grad):
    """Dist(h(z'), sg(z)) with Dist = 1 - cosine (Eqs. 4, 6, 7); Eq. 3 when stop_grad is False and h is identity.

    Eq. 5 is the reason for the asymmetry. The symmetric distance splits into two halves,
        Dist(z', z) = (Dist(z', sg(z)) + Dist(sg(z'), z)) / 2.
    The first pulls the adversarial feature z' towards the clean one ("purification"). The second pulls the clean
    feature towards the adversarial one ("corruption"): it moves the representation the classifier relies on towards
    features an attacker controls, so its gradient opposes the classification losses ("gradient conflict", Fig. 2).
    Detaching z keeps only the first half: the clean branch (and, with split BN, its auxiliary BNs) receives no
    gradient from this term at all, while the predictor h lets z' follow z without forcing z' itself to match.
    """
    target = z.detach() if stop_grad else z
    h = predictor(z_adv)
    dtype = torch.promote_types(h.dtype, torch.float32)  # bf16/fp16 features are compared in fp32
    return 1 - F.cosine_similarity(h.to(dtype), target.to(dtype), dim=1).mean()


def auto_balance(acc: float):
    """Eq. 8: alpha = Acc, beta = 1 - Acc, with Acc the clean accuracy of f^auxBN measured before the epoch."""
    return acc, 1.0 - acc


def arat_loss(model, head, x, x_adv, y, cfg, alpha, beta):
    """Eq. 7 (Eqs. 3, 4, 6 with the switches off): returns the total loss and its terms for logging.

    alpha CE(f(x'), y) + beta CE(f_aux(x), y) + gamma / L sum_l Dist(h_l(z'_l), sg(z_l))."""
    tap = head.tap
    with tap.capture() as z_adv:
        logits_adv = model(x_adv)  # f_theta: the main BNs see adversarial inputs only
    ce_adv = F.cross_entropy(logits_adv, y)
    terms = {"ce_adv": ce_adv, "acc_adv": (logits_adv.argmax(1) == y).float().mean()}
    loss = alpha * ce_adv
    if beta > 0 or tap.names:  # with beta = gamma = 0 this is plain AT (Madry et al.): no clean pass
        # f^auxBN: auxiliary BNs with split BN; otherwise the main BNs, in a separate pass ("mixture distribution")
        with bn_branch(model, "aux"), tap.capture() as z:
            logits = model(x)
        ce_clean = F.cross_entropy(logits, y)
        loss = loss + beta * ce_clean
        terms.update(ce_clean=ce_clean, acc_clean=(logits.argmax(1) == y).float().mean())
    terms["cls"] = loss
    if tap.names:  # gamma is shared evenly over the L layers (Sec. 3.5)
        pairs = zip(tap.names, head.predictors, strict=True)
        terms["inv"] = sum(invariance_loss(z_adv[n], z[n], h, cfg.stop_grad) for n, h in pairs) / len(tap.names)
        loss = loss + cfg.gamma * terms["inv"]
    return loss, terms


def gradient_similarity(cls_loss, inv_loss, weights):
    """Grad-sim of Table 17 / Fig. 2: cosine between the gradients of the classification loss (alpha CE' + beta CE)
    and of the invariance loss w.r.t. the Conv2d/Linear weights, and the fraction of those weights whose two gradients
    have opposite signs ("gradient conflict"). Layers after the taps get no invariance gradient and are left out."""
    g_cls = torch.autograd.grad(cls_loss, weights, retain_graph=True, allow_unused=True)
    g_inv = torch.autograd.grad(inv_loss, weights, retain_graph=True, allow_unused=True)
    both = [(a, b) for a, b in zip(g_cls, g_inv) if a is not None and b is not None]
    a, b = (torch.cat([g[i].flatten().float() for g in both]) for i in (0, 1))
    return F.cosine_similarity(a, b, dim=0), (a * b < 0).float().mean()


def lr_factor(epoch: int, drops, official_quirks: bool = False, lr: float = 0.1, warmup_lr=None) -> float:
    """Sec. 4: lr / 10 after each epoch count in `drops` (75 and 90 of 100); `epoch` counts from 0. With `warmup_lr`,
    epoch 1 alone runs at that lr (a warm-up epoch, as LBGAT's official schedule).

    The released schedule (official_quirks): epoch 1 at the literal 0.02 whatever the lr, then after epoch e the lr
    of get_lr(e), divided by 10 beyond 75, 90, 100 and 110 epochs; thresholds literal, hence one epoch late."""
    if official_quirks:
        return 0.02 / lr if epoch == 0 else 0.1 ** sum(epoch > t for t in (75, 90, 100, 110))
    if epoch == 0 and warmup_lr is not None:
        return warmup_lr / lr
    return 0.1 ** sum(epoch >= d for d in drops)


def lr_schedule(cfg) -> typing.Callable:
    """The lr factor of each epoch (counted from 0) of a resolved Config: the scheduler's lambda."""
    drops = [int(d) for d in cfg.lr_drops.split(",")]
    return lambda epoch: lr_factor(epoch, drops, cfg.official_quirks, cfg.lr, cfg.warmup_lr)


class Method(typing.NamedTuple):
    """A training method, the seam of the training loop; baselines.py adds AT, TRADES, MART, LBGAT, Asym-TRADES."""

    name: str
    attack: typing.Callable  # (model, extra, x, y, cfg, shard) -> (the batch the clean branch sees, x')
    loss: typing.Callable  # (model, extra, x, x', y, cfg, alpha, beta) -> (loss, {term: tensor})
    extra: typing.Callable  # (model, cfg) -> the nn.Module it trains besides the model (predictors, a teacher)
    balance: bool = True  # its loss weighs alpha and beta (Eq. 8): measured each epoch and logged
    grad_sim: tuple = ("cls", "inv")  # the loss terms Grad-sim compares: classification, regularisation (Table 17)


ARAT = Method("arat", arat_attack, arat_loss, InvarianceHead)


# ============================================================================================================ Plumbing
# --------------------------------------------------------------------------------------------------------------- Config


def arg(default, help, group=None):
    """A Config field with the help text of its flag (and, on the first field of a group, the group's title)."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group})


@dataclasses.dataclass
class Config:
    """Every flag of arat.py (`--batch-size` for `batch_size`); defaults are the paper's recipe (Sec. 4)."""

    dataset: str | None = arg(None, "cifar10 | cifar100 | imagenette | a folder with train/ and val/ class folders; "
                              "default cifar10, or the checkpoint's with --eval-only", "experiment")  # fmt: skip
    arch: str | None = arg(None, "resnet18 | preact18 | wrn34 (Sec. 4, Appendix E); default resnet18")
    out: str | None = arg(None, "output folder; default runs/<dataset>-<arch>-<method>-s<seed>")
    seed: int = arg(0, "seeds data order, augmentation, initialisation and attacks")
    resume: bool = arg(False, "continue the run in --out from its last.pt")
    device: str | None = arg(None, "cuda | cpu | cuda:1 ...; default cuda if available, else cpu")
    amp: str | None = arg(None, "bf16 | fp16 | off; default bf16 on GPUs and on CPUs with native bf16, else off")
    channels_last: bool | None = arg(None, "NHWC memory; default on, but off for fp32 on a CPU (the exact path)")
    compile: bool = arg(False, "torch.compile the model (feature capture, checkpoints and exports are unaffected)")
    benchmark: int = arg(0, "time N training steps after 2 warm-up steps, print a 'benchmark:' line, write nothing")
    eval_only: bool = arg(False, "evaluate --checkpoint without training", "evaluation only")
    checkpoint: str | None = arg(None, "last.pt, best.pt, swa.pt, an --export or a baselines.py checkpoint")
    export: str | None = arg(None, "write the inference model (main BNs, plain state_dict, inputs in [0, 1]) here")
    data_dir: str = arg("data", "where datasets are found, or downloaded to", "data")
    download: bool = arg(True, "download CIFAR / Imagenette into --data-dir when missing")
    image_size: int | None = arg(None, "crop side; default 32 (CIFAR), 128 (Imagenette, as released), a folder's own")
    workers: int | None = arg(None, "loading processes; default min(4, CPUs available)")
    epochs: int = arg(100, "training epochs", "optimisation (Sec. 4)")
    lr: float = arg(0.1, "SGD learning rate")
    lr_drops: str | None = arg(None, "epochs after which the lr is divided by 10; default 75%% and 90%% of --epochs")
    warmup_lr: float | None = arg(None, "lr of the first epoch only (a warm-up epoch); default --lr")
    momentum: float = arg(0.9, "SGD momentum")
    weight_decay: float = arg(5e-4, "on every parameter, predictors and BNs included (as released)")
    batch_size: int = arg(128, "images per optimiser step")
    max_steps: int | None = arg(None, "stop after this many optimiser steps; --resume with a larger value continues")
    official_quirks: bool = arg(False, "reproduce the released training loop exactly (README)")
    norm: str | None = arg(None, "linf | l2 (Appendix E); default linf, or the checkpoint's with --eval-only", "attack")
    eps: float | None = arg(None, "training budget; default 8/255 (linf), 0.5 (l2); fractions such as 8/255 work")
    step_size: float | None = arg(None, "PGD step; default 2/255 (linf), 0.125 (l2)")
    attack_steps: int = arg(10, "PGD steps in training (PGD-10, Sec. 4)")
    attack_mode: str | None = arg(None, "train | eval: BN mode of the training attack; default train (linf), eval (l2)")
    eval_eps: float | None = arg(None, "test budget; default 8/255 (linf), 0.5 (l2), whatever --eps", "evaluation")
    eval_step_size: float | None = arg(None, "test PGD step; default 2/255 (linf), 0.125 (l2)")
    eval_steps: int = arg(20, "PGD-20 (Sec. 4)")
    eval_every: int = arg(10, "PGD accuracy every this many epochs")
    eval_n: int | None = arg(None, "test images evaluated (CIFAR: the first N; folders: a fixed class-balanced set)")
    val_n: int = arg(0, "hold out N training images (fixed, class-balanced) to select best.pt by PGD; 0: off")
    aa_n: int = arg(0, "after training, standard AutoAttack on N test images (paper: 10000); 0: off")
    log_every: int = arg(50, "steps between progress lines")
    grad_sim_every: int = arg(0, "measure Grad-sim (Table 17, Fig. 2) every N steps; 0: off", "analyses")
    bn_stats: bool = arg(False, "log the spread of the BN running means of both BN sets every epoch (Fig. 14)")
    tensorboard: bool = arg(False, "write the per-epoch numbers as TensorBoard scalars into <out>/tb")
    swa: bool = arg(False, "average the weights (SWA, Table 3) and evaluate the average as well", "SWA")
    swa_start: int | None = arg(None, "first epoch averaged; default 76%% of --epochs")
    swa_every: int = arg(500, "optimiser steps between averaged snapshots")
    variant: str = arg("v3", "v0 | v1 | v2 | v3 (Table 17); v3 is AR-AT", "AR-AT (Eqs. 3-8, Sec. 3.5)")
    stop_grad: bool | None = arg(None, "sg(z) in the invariance loss (Eq. 4); default from --variant")
    predictor: bool | None = arg(None, "predictor MLP h on z' (Eq. 6); default from --variant")
    split_bn: bool | None = arg(None, "auxiliary BNs for clean inputs (Eq. 7); default from --variant")
    gamma: float | None = arg(None, "invariance weight; default 30 (resnet18, preact18), 100 (wrn34); 0: plain AT")
    layers: str | None = arg(None, "comma-separated module names regularised (Sec. 3.5); default per arch")
    auto_balance: bool = arg(True, "alpha = Acc, beta = 1 - Acc each epoch (Eq. 8)")
    alpha: float | None = arg(None, "fixed weight of CE(f(x'), y) with --no-auto-balance; default 1 (Table 6)")
    beta: float | None = arg(None, "fixed weight of CE(f_aux(x), y) with --no-auto-balance; default 1 (Table 6)")
    balance_n: int = arg(1000, "Acc of Eq. 8 on the first whole shuffled batches holding this many images")


# fmt: off
# Smallest valid value of each numeric flag, and the flags that must be positive (checked by `resolve`).
MINIMUM = {"epochs": 1, "batch_size": 2, "attack_steps": 1, "eval_steps": 1, "eval_every": 1, "log_every": 1,
           "max_steps": 1, "eval_n": 1, "balance_n": 1, "image_size": 8, "workers": 0, "aa_n": 0, "val_n": 0,
           "grad_sim_every": 0, "gamma": 0, "alpha": 0, "beta": 0, "weight_decay": 0, "momentum": 0,
           "swa_start": 1, "swa_every": 1, "benchmark": 0}
POSITIVE = ("lr", "warmup_lr", "eps", "step_size", "eval_eps", "eval_step_size")
CHOICES = {"arch": ARCHS, "variant": VARIANTS, "norm": THREATS, "attack_mode": ("train", "eval"),
           "amp": ("bf16", "fp16", "off")}
URLS = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "imagenette": "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"}  # 9,469 train / 3,925 val
CIFAR = ("cifar10", "cifar100")
# Flags that may differ when a run is resumed (--out is where the run is now); any other difference is refused.
RESUMABLE = {"resume", "out", "device", "workers", "log_every", "max_steps", "eval_every", "eval_n", "aa_n",
             "data_dir", "download", "grad_sim_every", "bn_stats", "tensorboard", "export", "compile", "channels_last",
             "benchmark"}
# fmt: on


def _one_of(flag, value, choices):
    if value not in choices:
        raise ConfigError(f"{flag}: invalid choice {value!r} (choose from {', '.join(choices)})")


def method_label(cfg: Config):
    """The run's name: "at" for plain AT, else the Table 17 preset that the switches match, else the switches."""
    if cfg.gamma == 0 and not cfg.auto_balance and cfg.beta == 0:
        return "at"
    named = [name for name, preset in VARIANTS.items() if preset == (cfg.stop_grad, cfg.predictor, cfg.split_bn)]
    return named[0] if named else f"sg{int(cfg.stop_grad)}-pred{int(cfg.predictor)}-sbn{int(cfg.split_bn)}"


def resolve(cfg: Config, label=method_label) -> Config:
    """Check every flag and fill in the derived defaults, once; returns a new Config. `label(cfg)` names the run."""
    if cfg.eval_only and not cfg.checkpoint:
        raise ConfigError("--eval-only: give the model to evaluate with --checkpoint PATH")
    if cfg.eval_only and cfg.benchmark:
        raise ConfigError("--benchmark: times training steps, so it cannot run with --eval-only")
    saved = read_checkpoint(cfg.checkpoint)[1] if cfg.eval_only else {}  # what the model was trained with
    if cfg.eval_only and not cfg.dataset and "dataset" not in saved:
        raise ConfigError(f"--dataset: {cfg.checkpoint} is an exported model, which does not say: give its dataset")
    if cfg.eval_only and cfg.arch not in (None, saved["arch"]):
        raise ConfigError(f"--arch: {cfg.checkpoint} holds a {saved['arch']}, not a {cfg.arch}; leave --arch out")
    dataset = cfg.dataset or saved.get("dataset", "cifar10")
    norm = cfg.norm or saved.get("norm", "linf")
    cfg = dataclasses.replace(cfg, dataset=dataset, norm=norm, arch=saved.get("arch", cfg.arch or "resnet18"))
    for name, choices in CHOICES.items():
        if getattr(cfg, name) is not None:
            _one_of("--" + name.replace("_", "-"), getattr(cfg, name), list(choices))
    for name, low in MINIMUM.items():
        if (value := getattr(cfg, name)) is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least {low}, got {value}")
    for name in POSITIVE:
        if (value := getattr(cfg, name)) is not None and not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be positive, got {value}")
    if cfg.dataset not in URLS and not Path(cfg.dataset).is_dir():
        raise ConfigError(f"--dataset: {cfg.dataset!r} is neither one of {', '.join(URLS)} nor a folder")
    if cfg.auto_balance and (cfg.alpha is not None or cfg.beta is not None):
        raise ConfigError("--alpha/--beta: fixed weights need --no-auto-balance (auto-balance sets them, Eq. 8)")
    if cfg.dataset in CIFAR and cfg.image_size not in (None, 32):
        raise ConfigError(f"--image-size: CIFAR images are 32x32, got {cfg.image_size}; it applies to image folders")
    if cfg.lr_drops and not re.fullmatch(r"\d+(,\d+)*", cfg.lr_drops):
        raise ConfigError(f"--lr-drops: give epochs separated by commas, such as 75,90, not {cfg.lr_drops!r}")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device) or device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device: {device!r} is not available here (cpu, or cuda, cuda:1 ... on a GPU machine)")
    if cfg.amp == "fp16" and device == "cpu":  # emulated there: a step took ~9x as long as in native bf16
        faster = "bf16" if bf16_supported("cpu") else "off"
        raise ConfigError(f"--amp fp16: a CPU emulates fp16, which makes every step far slower; use --amp {faster}")
    for flag, value in (("--eps", cfg.eps), ("--eval-eps", cfg.eval_eps)):
        if cfg.norm == "linf" and value is not None and value >= 1:  # inputs are in [0, 1]: 8 meant 8/255
            raise ConfigError(f"{flag}: an L-inf budget of {value:g} spans all of [0, 1]; try 8/255")

    switches = zip((cfg.stop_grad, cfg.predictor, cfg.split_bn), VARIANTS[cfg.variant])
    sg, pred, split = (default if given is None else given for given, default in switches)
    gamma = ARCHS[cfg.arch][0] if cfg.gamma is None else cfg.gamma
    layers = ARCHS[cfg.arch][1] if cfg.layers is None else [n.strip() for n in cfg.layers.split(",") if n.strip()]
    if gamma > 0 and not layers:
        raise ConfigError("--layers: give at least one module name, or --gamma 0 for no invariance term")
    alpha = 1.0 if cfg.alpha is None else cfg.alpha  # fixed weights: 1 and 1 (Table 6)
    beta = 1.0 if cfg.beta is None else cfg.beta
    cfg = dataclasses.replace(cfg, stop_grad=sg, predictor=pred, split_bn=saved.get("split_bn", split), alpha=alpha)
    cfg = dataclasses.replace(cfg, beta=beta, gamma=gamma, layers=",".join(layers) if gamma > 0 else "")  # 0: plain AT
    eps, step = THREATS[cfg.norm]
    cfg = dataclasses.replace(cfg, eps=cfg.eps or eps, step_size=cfg.step_size or step, eval_eps=cfg.eval_eps or eps)
    amp = "bf16" if bf16_supported(device.split(":")[0]) and not cfg.official_quirks else "off"  # released: fp32
    mode = "train" if cfg.norm == "linf" else "eval"  # as released (torchattacks' L2 attack runs in eval mode)
    drops = f"{round(0.75 * cfg.epochs)},{round(0.9 * cfg.epochs)}"
    swa_start = max(1, round(0.76 * cfg.epochs))
    cfg = dataclasses.replace(cfg, eval_step_size=cfg.eval_step_size or step, device=device, amp=cfg.amp or amp)
    # NHWC speeds convolutions up (tensor cores; CPU: AR-AT step 6% faster in bf16, 9% in fp32), but on a CPU in fp32
    # it changes their rounding, and fp32 on a CPU is where a training step equals the released code's bit for bit.
    fast = cfg.amp != "off" or not device.startswith("cpu")
    cfg = dataclasses.replace(cfg, channels_last=fast if cfg.channels_last is None else cfg.channels_last)
    cfg = dataclasses.replace(cfg, attack_mode=cfg.attack_mode or mode, lr_drops=cfg.lr_drops or drops)
    size = {**dict.fromkeys(CIFAR, 32), "imagenette": 128}.get(cfg.dataset)  # Imagenette: 128 crops, as released
    size = cfg.image_size or saved.get("image_size") or size or _folder_image_size(Path(cfg.dataset))
    workers = min(4, len(os.sched_getaffinity(0))) if cfg.workers is None else cfg.workers
    cfg = dataclasses.replace(cfg, image_size=size, workers=workers, swa_start=cfg.swa_start or swa_start)
    ckpt = Path(cfg.checkpoint or ".")
    name = f"runs/{Path(cfg.dataset).name}-{cfg.arch}-{label(cfg)}-s{cfg.seed}"
    out = Path(cfg.out or (ckpt.parent / f"eval-{ckpt.stem}" if cfg.eval_only else name))
    outputs = {"--out": out} | ({"--export": Path(cfg.export).absolute().parent} if cfg.export else {})
    for flag, folder in outputs.items():
        existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())  # made when written
        if not existing.is_dir() or not os.access(existing, os.W_OK):  # refused now, not after hours of training
            raise ConfigError(f"{flag}: cannot write in {folder}: {existing} is not a folder this process can write in")
    return dataclasses.replace(cfg, out=str(out))


def bf16_supported(device_type):
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    # On a CPU, native bf16 (AVX512-BF16 or AMX) runs ~2-3x faster than fp32; emulated bf16 (AVX2) is slower.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: absent in some torch builds
    return device_type == "cpu" and any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the message names the flag
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(text):
    """Floats, and fractions such as 8/255."""
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None


def parse_args(argv=None, config=Config, prog="arat.py", description=__doc__.split("\n\n")[0]) -> Config:
    """A flag per field of `config` (Config or a subclass), with the field's own type, default, help and group."""
    # only full flag names: --epoch must not silently mean --epochs
    parser = _Parser(prog, description=description, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False)
    hints, group = typing.get_type_hints(config), parser  # types also where annotations are strings
    for f in dataclasses.fields(config):
        if "help" not in f.metadata:  # no field may be without its flag
            raise TypeError(f"{config.__name__}.{f.name}: declare it with arg(default, help) to give it a flag")
        group = parser.add_argument_group(f.metadata["group"]) if f.metadata["group"] else group
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])  # int | None
        how = {"action": argparse.BooleanOptionalAction} if kind is bool else {"metavar": f.name.upper()}
        how |= {} if kind is bool else {"type": _number if kind is float else kind}
        action = group.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"], **how)
        if f.default is not None and "%(default)" not in action.help:
            action.help += " (default: %(default)s)"
    return config(**vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------------------------------------------- Data


class TensorImages:
    """CIFAR as uint8 tensors on the training device (50,000 images are 150 MB), cropped and flipped there: a CPU
    loader cannot feed a fast GPU. Each image's crop and flip is drawn from the pass's seed, whichever batch it lands
    in, so N processes under torchrun see exactly what one process would. Batches in [0, 1], as torchvision's."""

    def __init__(self, dataset, device):
        self.x = torch.as_tensor(dataset.data).permute(0, 3, 1, 2).contiguous().to(device)  # N x 3 x 32 x 32
        self.targets = list(dataset.targets)
        self.y = torch.as_tensor(self.targets, device=device)

    def batches(self, index_batches, seed=None):
        """The given batches; augmented when `seed` is given (Sec. 4: random crop after 4 px zero padding, flip)."""
        device = self.x.device
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            shift = torch.randint(0, 9, (len(self.y), 2), generator=g).to(device)
            flip = torch.rand(len(self.y), generator=g).to(device)
        for idx in index_batches:
            idx = idx.to(device)
            x = self.x[idx]
            if seed is not None:
                rows, cols = (shift[idx, i, None] + torch.arange(x.shape[-1], device=device) for i in (0, 1))
                batch = torch.arange(len(idx), device=device)[:, None, None, None]
                channel = torch.arange(3, device=device)[:, None, None]
                x = F.pad(x, (4, 4, 4, 4))[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
                x = torch.where(flip[idx, None, None, None] < 0.5, x.flip(3), x)
            yield x.to(torch.get_default_dtype()).div(255), self.y[idx]  # float32 unless set otherwise


class Images:
    """An image folder (a subfolder per class) read by DataLoader workers, in [0, 1]
    without mean/std normalisation. Training takes random crops after 4 px zero padding and flips (Sec. 4; on
    Imagenette 128 px crops of the 160 px images, as released), evaluation the centre crop: nothing is resized."""

    def __init__(self, dataset, size, workers, device):
        self.plain = dataset
        self.augmented = copy.copy(dataset)
        self.plain.transform = T.Compose([T.CenterCrop(size), T.ToTensor()])
        self.augmented.transform = T.Compose([T.RandomCrop(size, 4, True), T.RandomHorizontalFlip(), T.ToTensor()])
        self.targets, self.workers, self.device = dataset.targets, workers, device

    def batches(self, index_batches, seed=None):
        """The given batches, on the device; augmented when `seed` is given, which alone decides the augmentation."""
        loader = torch.utils.data.DataLoader(
            self.plain if seed is None else self.augmented,
            batch_sampler=[b.tolist() for b in index_batches],
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed or 0),  # worker seeds come from it, not from the global RNG
            worker_init_fn=_ignore_ctrl_c,  # a terminal's Ctrl-C reaches the workers too: training decides when to stop
        )
        return ((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)) for x, y in loader)


def _ignore_ctrl_c(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def load_data(cfg: Config, device):
    """(train images, test images, number of classes); CIFAR and Imagenette are downloaded when missing."""
    try:
        if cfg.dataset in CIFAR:
            cls = datasets.CIFAR10 if cfg.dataset == "cifar10" else datasets.CIFAR100
            sets = [cls(cfg.data_dir, train=train, download=cfg.download) for train in (True, False)]
        else:
            root = Path(cfg.dataset)
            if cfg.dataset == "imagenette":  # the 160 px release, read as an image folder
                datasets.Imagenette(cfg.data_dir, "train", "160px", download=cfg.download)  # extracts train/, val/
                root = Path(cfg.data_dir) / "imagenette2-160"
            sets = [datasets.ImageFolder(root / split) for split in ("train", "val")]
    except (RuntimeError, OSError) as e:  # missing with --no-download, or offline (URLError is an OSError)
        if cfg.dataset not in URLS:
            raise ConfigError(f"--dataset: {e} (a folder dataset needs train/ and val/, a folder per class)") from None
        why = "--no-download was given" if not cfg.download else f"downloading it failed ({e})"
        where = f"{URLS[cfg.dataset]} and extract it in {os.path.abspath(cfg.data_dir)}, or point --data-dir at it"
        raise ConfigError(f"--dataset {cfg.dataset}: not found in {cfg.data_dir} and {why}; download {where}") from None
    if sets[0].classes != sets[1].classes:
        raise ConfigError(f"--dataset: train/ and val/ of {cfg.dataset} have different class folders")
    if cfg.dataset in CIFAR:
        return *(TensorImages(s, device) for s in sets), len(sets[0].classes)
    return *(Images(s, cfg.image_size, cfg.workers, device) for s in sets), len(sets[0].classes)


def _folder_image_size(root: Path):
    """A folder's default crop: its images' own (shorter) side. Mixed sizes are refused: which crop is unclear."""
    try:
        paths = [p for split in ("train", "val") for p, _ in datasets.ImageFolder(root / split).samples]
    except (FileNotFoundError, RuntimeError) as e:
        raise ConfigError(f"--dataset: {e} (a folder dataset needs train/ and val/, a subfolder per class)") from None
    sizes = {}
    for path in paths:
        with PIL.Image.open(path) as image:
            sizes.setdefault(image.size, path)
    if len(sizes) > 1:
        (a, p), (b, q) = list(sizes.items())[:2]
        raise ConfigError(f"--image-size: {root} mixes sizes ({a} {p}, {b} {q}); --image-size N crops all to N x N")
    return min(next(iter(sizes)))


def index_batches(indices, batch_size, seed=None, drop_last=False, shard=(0, 1)):
    """The batches of one pass over `indices`, shuffled by `seed` unless it is None. Under torchrun each process
    keeps rows rank::world of every global batch: together they see exactly the batches one process would."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    if seed is not None:
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))]
    stop = len(idx) - len(idx) % batch_size if drop_last else len(idx)
    return [idx[i : i + batch_size][shard[0] :: shard[1]] for i in range(0, stop, batch_size)]


def balanced_order(targets, seed=0):
    """Every index once, the classes taking turns (a fixed seeded shuffle within each class), so that any prefix is
    a class-balanced sample: image folders are stored class by class, and their first N images are one class."""
    by_class = {}
    for i in torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed)).tolist():
        by_class.setdefault(targets[i], []).append(i)
    return [i for turn in itertools.zip_longest(*by_class.values()) for i in turn if i is not None]


def eval_indices(cfg: Config, data, n):
    """The evaluated test images: CIFAR's first n (RobustBench's convention), a folder's fixed class-balanced n."""
    n = min(n or len(data.targets), len(data.targets))
    return list(range(n)) if cfg.dataset in CIFAR else balanced_order(data.targets)[:n]


# ------------------------------------------------------------------------------------------------------------- Evaluate


class EvaluationError(RuntimeError):
    """An evaluation that contradicts itself (an example out of its ball, PGD above clean, AutoAttack above PGD)
    reveals a bug or gradient masking: the run stops rather than report the number."""


class RunFinished(Exception):
    """--resume of a run with nothing left to do: one line, exit code 0, nothing overwritten."""


def _check_ball(x_adv, x, eps, norm, attack):
    dist = (x_adv - x).flatten(1).norm(p=math.inf if norm == "linf" else 2, dim=1).max().item()
    if dist > eps * (1 + 1e-5) + 1e-6 or x_adv.min() < 0 or x_adv.max() > 1:
        raise EvaluationError(f"{attack}: an example lies {dist:.6g} from its image (eps {eps:.6g}) or off [0, 1]")


def evaluate(model, data, indices, cfg: Config, branch="main", attack=True, seed=None, label=None):
    """Percent correct in eval mode through the main BNs (inference, Sec. 3.3) or the auxiliary ones (Table 8); with
    `attack` also under PGD at the evaluation budget, each example checked to lie in its ball, and the mean cosine
    similarity of clean and adversarial penultimate features (Table 5). `seed` augments the images."""
    tap = FeatureTap(model, [ARCHS[cfg.arch][2]])
    batches = index_batches(indices, cfg.batch_size)
    start = time.time()
    device = next(model.parameters()).device
    sums = torch.zeros(3, device=device)  # clean correct, PGD correct, cosine
    try:  # PGD's random starts from an RNG of their own: the same figures whenever it runs, and training unaffected
        with torch.random.fork_rng([device] if device.type == "cuda" else []), train_mode(model, False):
            torch.manual_seed(cfg.seed)
            for i, (x, y) in enumerate(data.batches(batches, seed), 1):
                with torch.no_grad(), bn_branch(model, branch), tap.capture() as z:
                    sums[0] += (model(x).argmax(1) == y).sum()
                if attack:
                    with bn_branch(model, branch):
                        x_adv = pgd(model, x, y, cfg.eval_eps, cfg.eval_step_size, cfg.eval_steps, cfg.norm)
                    _check_ball(x_adv, x, cfg.eval_eps, cfg.norm, f"PGD-{cfg.eval_steps}")
                    with torch.no_grad(), bn_branch(model, branch), tap.capture() as z_adv:
                        sums[1] += (model(x_adv).argmax(1) == y).sum()
                    sums[2] += F.cosine_similarity(*(f[tap.names[0]].float() for f in (z, z_adv))).sum()
                if label:
                    progress(f"{label} ({branch} BNs): batch", i, len(batches), start)
    finally:
        tap.remove()
    clean, robust, cos = (100 * v / max(len(indices), 1) for v in sums.tolist())
    if attack and robust > clean:
        raise EvaluationError(
            f"PGD-{cfg.eval_steps} accuracy {robust:.2f}% exceeds clean accuracy {clean:.2f}% on the same "
            f"{len(indices)} images ({branch} BNs): the attack helps the model, so something is broken"
        )
    return {"clean": clean} | ({"robust": robust, "cos": cos / 100} if attack else {})


def autoattack(model, data, indices, cfg: Config, every=30.0):
    """Standard AutoAttack (Croce & Hein, 2020), eval mode, main BNs, fp32: the original package (`autoattack`) if
    installed, else its PyPI repackaging `pyautoattack` (keyword-only API). The record keeps the robust accuracy after
    each of the four attacks: a large drop after APGD-CE alone is the classic sign of gradient masking. Both packages
    print a line after each attack; inside one, a line every `every` seconds says it is at work."""
    try:
        import autoattack as package
    except ImportError:
        import pyautoattack as package
    x, y = (torch.cat(t) for t in zip(*data.batches(index_batches(indices, cfg.batch_size))))
    settings = {"norm": cfg.norm.capitalize(), "eps": cfg.eval_eps, "seed": cfg.seed, "version": "standard"}
    log = logging.getLogger("auto-attack")  # pyautoattack logs here
    path = Path(cfg.out) / "autoattack.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    seen = {"images": 0, "shown": start}

    def tick(module, inputs, output):
        seen["images"] += len(inputs[0])
        if time.time() - seen["shown"] >= every:
            seen["shown"] = time.time()
            print(f"AutoAttack: {seen['images']} images through the model in {time.time() - start:.0f} s", flush=True)

    with contextlib.ExitStack() as undo, train_mode(model, False):  # the logger and the model left as found
        for handler in (logging.FileHandler(path, "w"), logging.StreamHandler(sys.stdout)):
            log.addHandler(handler)
            undo.callback(handler.close)
            undo.callback(log.removeHandler, handler)
        undo.callback(log.setLevel, log.level)
        log.setLevel(logging.DEBUG)
        undo.callback(model.register_forward_hook(tick).remove)
        if package.__name__ == "autoattack":  # it prints its progress and appends the same lines to log_path
            adversary = package.AutoAttack(model, device=x.device, log_path=path, **settings)
            x_adv, y_adv = adversary.run_standard_evaluation(x, y, bs=cfg.batch_size, return_labels=True)
        else:
            adversary = package.AutoAttack(model, device=x.device, **settings)
            x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=cfg.batch_size)
    _check_ball(x_adv, x, cfg.eval_eps, cfg.norm, "AutoAttack")
    try:
        version = importlib.metadata.version(package.__name__)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(package, "__version__", "unknown")
    after = re.findall(r"robust accuracy after ([\w-]+): ([\d.]+)%", path.read_text())
    acc = 100 * (y_adv.to(y.device) == y).float().mean().item()
    record = {"acc": acc, "n": len(y), "after": {a.lower(): float(v) for a, v in after}}
    return record | settings | {"package": package.__name__, "package_version": version}


def reestimate_bn(model, data, indices, cfg: Config, autocast):
    """BN statistics for averaged (SWA) weights over one pass of the training images: the main BNs on PGD examples of
    the averaged model, the auxiliary BNs on the clean images, exact averages (momentum None). The attack normalises
    with batch statistics but moves none (the released code let it, and left the auxiliary BNs reset)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    batches = index_batches(indices, cfg.batch_size, cfg.seed)
    start = time.time()
    with train_mode(model, True), autocast():
        for i, (x, y) in enumerate(data.batches(batches, cfg.seed), 1):
            for m in bns:
                m.track_running_stats = False  # batch statistics, no update
            x_adv = pgd(model, x, y, cfg.eps, cfg.step_size, cfg.attack_steps, cfg.norm)
            for m in bns:
                m.track_running_stats = True
            with torch.no_grad(), bn_branch(model, "aux"):
                model(x)
            with torch.no_grad():
                model(x_adv)
            progress("SWA BN statistics: batch", i, len(batches), start)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return model.eval()


# ------------------------------------------------------------------------------------------------ Checkpoints, logs


def save_checkpoint(state: dict, path: Path):
    """Write to a temporary file, then rename: an interrupted save never destroys the previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_file(path, flag="--checkpoint", device="cpu"):
    """A saved dict; a missing, truncated or corrupt file is one line of error."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False, mmap=str(device) == "cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ConfigError(f"{flag}: cannot read {path} ({e})") from None
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{flag}: {path} holds a {type(ckpt).__name__}, not a checkpoint")
    return ckpt


def read_checkpoint(path):
    """(model state_dict, settings) of last.pt, best.pt, swa.pt, a baselines.py checkpoint or an exported model."""
    ckpt = load_file(path)
    if "model" in ckpt and "config" in ckpt:
        settings = {k: ckpt["config"][k] for k in ("arch", "split_bn", "image_size", "dataset", "norm")}
        return ckpt["model"], settings | {"num_classes": ckpt["num_classes"], "epoch": ckpt.get("epoch")}
    classes = ckpt["fc.weight"].shape[0] if torch.is_tensor(ckpt.get("fc.weight")) else 0
    for arch in ARCHS:  # an exported model: the architecture with the same state_dict keys and shapes
        with torch.device("meta"):
            ref = build_model(arch, classes, split_bn=False).state_dict()
        if ref.keys() == ckpt.keys() and all(ref[k].shape == ckpt[k].shape for k in ref):
            return ckpt, {"arch": arch, "split_bn": False, "num_classes": classes}
    raise ConfigError(f"--checkpoint: {path} is neither a checkpoint of arat.py or baselines.py nor an exported model")


def rng(device, states=None):
    """The RNG states (torch, this CUDA device); given states, restores them instead."""
    if states is None:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return {"torch": torch.get_rng_state(), "cuda": cuda}
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


def eta(start, done, left):
    """Speed and time left, from the time since `start` and the work done since then."""
    elapsed = time.time() - start
    s = int(elapsed * left / max(done, 1))
    return f"{done / max(elapsed, 1e-9):.2f} it/s | ETA {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress(what, i, n, start):
    """A progress line after each tenth of a pass of n items, and after the last."""
    if i % max(1, n // 10) == 0 or i == n:
        print(f"{what} {i}/{n} | {eta(start, i, n - i)}", flush=True)


# ------------------------------------------------------------------------------------------------------------------ Run


class Trainee(nn.Module):
    """The model and the method's extra modules, with the method's loss as forward: what DDP wraps under torchrun,
    so that it sees one forward per backward however many passes the loss makes."""

    def __init__(self, model, extra, loss):
        super().__init__()
        self.model, self.extra, self.loss = model, extra, loss

    def forward(self, *args):
        return self.loss(self.model, self.extra, *args)


def _distributed(cfg: Config):
    """(rank, world size, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK: a process per GPU (NCCL), or per
    CPU worker (gloo); --batch-size stays the global batch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(cfg.device)
    if world == 1:
        return 0, 1, device
    if cfg.official_quirks or cfg.batch_size % world:
        raise ConfigError(f"torchrun: --batch-size must divide among {world} processes; --official-quirks runs in one")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # rank 0 evaluates alone: the others may wait long at their next collective
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6))
    return dist.get_rank(), world, device


def _global_batch_norm(bn, group, x):
    """A train-mode BN forward with the statistics of the global batch (a differentiable all-reduce), so that N
    processes compute what one would, attack steps included; nn.SyncBatchNorm does the same on GPUs only."""
    if not (bn.training and dist.is_initialized()):
        return type(bn).forward(bn, x)
    dims = [0, *range(2, x.dim())]
    c = x.shape[1]
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    shape = (1, c, *[1] * (x.dim() - 2))
    count = torch.full((1,), x.numel() / c, dtype=xf.dtype, device=x.device)
    sums = dist_nn.all_reduce(torch.cat([xf.sum(dims), count]), group=group)
    n = sums[-1]
    mean = sums[:c] / n
    var = dist_nn.all_reduce((xf - mean.view(shape)).square().sum(dims), group=group) / n  # two passes, as BN does
    with torch.no_grad():
        bn.num_batches_tracked += 1
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), bn.momentum)
        bn.running_var.lerp_((var * n / (n - 1)).to(bn.running_var.dtype), bn.momentum)
    out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    return (out * bn.weight.view(shape) + bn.bias.view(shape)).to(x.dtype)


class Run:
    """One run of a method (AR-AT, or one of baselines.py's) from a resolved Config: `train`, then `report`. With
    --eval-only it holds the checkpoint's model alone."""

    # Where training is: last.pt holds it with every part; `partial`: the sums of an epoch cut short, for its record
    POSITION = ("epoch", "step", "batch", "history", "best", "partial")

    def __init__(self, cfg: Config, method: Method = ARAT, label="v3"):
        self.cfg, self.method, self.label, self.out = cfg, method, label, Path(cfg.out)
        self.rank, self.world, self.device = _distributed(cfg)
        torch.manual_seed(cfg.seed)
        if not (cfg.eval_only or cfg.benchmark) and cfg.resume != (self.out / "last.pt").exists():
            if cfg.resume:
                raise ConfigError(f"--resume: there is no checkpoint at {self.out / 'last.pt'}")
            raise ConfigError(f"--out: {self.out} already holds a run; add --resume to continue it, or choose another")
        resumed = self.resumable() if cfg.resume and not cfg.eval_only else None
        self.train_set, self.test_set, self.classes = load_data(cfg, self.device)
        if cfg.aa_n and self.classes < 10:
            raise ConfigError(f"--aa-n: standard AutoAttack needs at least 10 classes (9 targets), not {self.classes}")
        for flag, n in (("--eval-n", cfg.eval_n), ("--aa-n", cfg.aa_n)):
            if n and n > len(self.test_set.targets):
                print(f"{flag}: the test set has {len(self.test_set.targets)} images, not {n}: all are evaluated")
        self.test_idx = eval_indices(cfg, self.test_set, cfg.eval_n)
        self.val_idx = balanced_order(self.train_set.targets)[: cfg.val_n]  # the same images whatever --seed
        self.train_idx = sorted(set(range(len(self.train_set.targets))) - set(self.val_idx))
        if not cfg.eval_only and len(self.train_idx) < cfg.batch_size:
            raise ConfigError(f"--batch-size: {cfg.batch_size} is more than the {len(self.train_idx)} training images")
        # One place for precision: bf16 autocast needs no loss scaling; fp16 needs GradScaler (and pgd scales its loss).
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.autocast = functools.partial(torch.autocast, self.device.type, dtype=dtype, enabled=dtype is not None)
        self.model = build_model(cfg.arch, self.classes, cfg.split_bn).to(self.device)
        self.swa = None
        self.best = None
        self.writer = None
        self.epoch = 0  # finished epochs
        self.step = 0  # optimiser steps
        self.batch = 0  # batches done in the epoch
        self.history = []  # the per-epoch records: log.jsonl
        self.partial = {"sums": {}, "counts": {}}
        self.stopping = False  # set by Ctrl-C: training ends after the current step
        if cfg.eval_only:
            state, saved = read_checkpoint(cfg.checkpoint)
            if saved["num_classes"] != self.classes:
                raise ConfigError(f"--dataset: {cfg.dataset} has {self.classes} classes, not {saved['num_classes']}")
            self.model.load_state_dict(state)
            trained = f", trained to epoch {saved['epoch']}" if saved.get("epoch") is not None else ""
            print(f"loaded {cfg.checkpoint}: {cfg.arch}, {self.classes} classes{trained}", flush=True)
            return
        self.extra = method.extra(self.model, cfg).to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its convolution algorithms once
        self.model.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        self.fwd = torch.compile(self.model) if cfg.compile else self.model  # hooks are in: features are captured
        self.trainee = Trainee(self.fwd, self.extra, method.loss)
        if self.world > 1:
            group = dist.new_group()  # BN statistics travel apart from DDP's gradient buckets
            for m in [*self.model.modules(), *self.extra.modules()]:
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.forward = functools.partial(_global_batch_norm, m, group)
            ddp = nn.parallel.DistributedDataParallel
            self.trainee = ddp(self.trainee, broadcast_buffers=False, find_unused_parameters=True)
        params = [*self.model.parameters(), *self.extra.parameters()]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(cfg))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.swa = torch.optim.swa_utils.AveragedModel(self.model) if cfg.swa else None  # equal weights
        self.weights = [m.weight for m in self.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]  # Grad-sim
        if resumed is not None:  # every part (the SWA average too), the RNGs, and where training is (inside an epoch)
            for name, part in self.parts().items():
                part.load_state_dict(resumed[name])
            rng(self.device, resumed["rng"])
            for k in Run.POSITION:
                setattr(self, k, resumed[k])

    def parts(self):
        names = ("model", "extra", "optimizer", "scheduler", "scaler") + (("swa",) if self.swa else ())
        return {name: getattr(self, name) for name in names}

    def state(self, net, **more):
        """A checkpoint --eval-only can rebuild the model from: its weights, the config and the number of classes."""
        return {"model": net.state_dict(), "config": dataclasses.asdict(self.cfg), "num_classes": self.classes} | more

    def resumable(self):
        """--resume, checked before any work: last.pt, read whole; the script and the flags it was trained with; a
        finished run is left as it is. Paths compare by what they point to: a run folder may be moved or copied."""
        cfg = self.cfg
        path = self.out / "last.pt"
        ckpt = load_file(path, "--resume", self.device)
        saved = ckpt.get("config", {})
        if ("method" in saved) != hasattr(cfg, "method"):  # baselines.py's configs name their method
            script = f"baselines.py --method {saved['method']}" if "method" in saved else "arat.py"
            raise ConfigError(f"--resume: {path} was trained by {script}: resume it with that command")
        for k, v in saved.items():
            now = getattr(cfg, k, v)
            if k in ("dataset", "checkpoint") and now and v:
                now = Path(now).resolve()
                v = Path(v).resolve()
            if k not in RESUMABLE and now != v:
                k = k.replace("_", "-")
                raise ConfigError(f"--resume: {path} was trained with --{k} {v}, not {now}; resume with the same flags")
        done = ckpt["epoch"] >= cfg.epochs or ckpt["step"] >= (cfg.max_steps or math.inf)
        if done and (metrics := self.out / "metrics.json").exists():
            raise RunFinished(f"this run has finished ({metrics}); use --eval-only to evaluate it again")
        return ckpt

    def train_step(self, x, y, alpha, beta, grad_sim=False):
        """One step of the method: its attack, its loss, one backward, one SGD step; returns the loss terms."""
        with self.autocast():
            x, x_adv = self.method.attack(self.fwd, self.extra, x, y, self.cfg, (self.rank, self.world))
            loss, terms = self.trainee(x, x_adv, y, self.cfg, alpha, beta)
        cls, reg = self.method.grad_sim
        if grad_sim and reg in terms:  # Table 17, on the step's own graph: no gradient or weight changes
            terms["grad_sim"], terms["conflict_frac"] = gradient_similarity(terms[cls], terms[reg], self.weights)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"loss": loss} | terms

    def train_epoch(self, seed, alpha, beta, start):
        """Steps from batch self.batch of epoch self.epoch to its end or to --max-steps; returns the mean terms."""
        cfg = self.cfg
        self.trainee.train()
        batches = index_batches(self.train_idx, cfg.batch_size, seed, not cfg.official_quirks, (self.rank, self.world))
        stream = self.train_set.batches(batches, seed)
        if self.batch:  # resuming inside the epoch: skip what was trained, then go on with the checkpoint's RNG
            states = rng(self.device)
            for _ in itertools.islice(stream, self.batch):
                pass
            rng(self.device, states)
        sums = self.partial["sums"]  # an epoch cut short and resumed: its record averages all its steps
        counts = self.partial["counts"]
        total = min(cfg.epochs * len(batches), cfg.max_steps or math.inf)
        aux = [m.aux for m in self.model.modules() if isinstance(m, SplitBatchNorm2d)] if cfg.bn_stats else []
        main = [m for m in self.model.modules() if type(m) is nn.BatchNorm2d and all(m is not a for a in aux)]
        bn_sets = {k: bns for k, bns in (("main", main), ("aux", aux)) if bns and cfg.bn_stats}
        for x, y in stream:
            terms = self.train_step(x, y, alpha, beta, cfg.grad_sim_every and self.step % cfg.grad_sim_every == 0)
            self.step += 1
            self.batch += 1
            if self.swa is not None and self.epoch + 1 >= cfg.swa_start and self.step % cfg.swa_every == 0:
                self.swa.update_parameters(self.model)
            for k, bns in bn_sets.items():  # Fig. 14: how far each running mean moves over the epoch
                mean = torch.cat([m.running_mean for m in bns])
                terms |= {f"bn_{k}": mean, f"bn_{k}_sq": mean.square()}
            for k, v in terms.items():  # summed on the device: the host syncs only at log points
                sums[k] = sums.get(k, 0) + v.detach().double()
                counts[k] = counts.get(k, 0) + 1
            if self.rank == 0 and (self.step % cfg.log_every == 0 or self.batch == len(batches) or self.step == total):
                named = ("loss", "ce_adv", self.method.grad_sim[1])  # the method's own regulariser: inv, kl, ...
                means = {k: (sums[k] / counts[k]).item() for k in named if k in sums}
                shown = " ".join(f"{k} {v:.3f}" for k, v in means.items())
                where = f"epoch {self.epoch + 1} step {self.batch}/{len(batches)}"
                print(f"{where} | {shown} | {eta(start[0], self.step - start[1], total - self.step)}", flush=True)
            if self.step == cfg.max_steps or self.stopping:
                break
        if self.batch == len(batches):
            self.epoch += 1
            self.batch = 0
            self.partial = {"sums": {}, "counts": {}}
            self.scheduler.step()
        means = {k: v / counts[k] for k, v in sums.items() if k != "cls"}
        for k in bn_sets:  # each running mean's variance over the epoch's steps, averaged over the set's channels
            means[f"bn_var_{k}"] = (means.pop(f"bn_{k}_sq") - means.pop(f"bn_{k}").square()).mean()
        return {k: v.item() * (100 if k.startswith("acc") else 1) for k, v in means.items()}

    def train(self):
        """The epochs: auto-balance (Eq. 8), method steps, evaluation, checkpoints, logs; resumable at any point."""
        cfg = self.cfg
        start = (time.time(), self.step)
        if self.rank == 0:  # under torchrun, rank 0 alone writes, prints and evaluates
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
            print(self.summary(), flush=True)
            if cfg.tensorboard:
                try:  # optional: nothing else needs TensorBoard
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ConfigError("--tensorboard: TensorBoard is not installed; pip install tensorboard") from None
                self.writer = SummaryWriter(self.out / "tb")
        while self.epoch < cfg.epochs and self.step < (cfg.max_steps or math.inf) and not self.stopping:
            step = self.step
            t0 = time.time()
            seed = (cfg.seed * 1_000_003 + self.epoch) * 2  # the epoch's order and augmentation, whenever it runs
            if self.batch:  # resuming inside an epoch: its record so far is replaced, its alpha and beta kept
                cut = self.history.pop()
                acc, alpha, beta = (cut.get(k) for k in ("balance_acc", "alpha", "beta"))
            elif not self.method.balance:  # no alpha or beta to measure (AT, TRADES, MART, LBGAT)
                acc = alpha = beta = None
            else:  # Eq. 8 with Acc of the model before this epoch (epoch 1 starts near chance, so beta ~ 1 at first)
                n = math.ceil(cfg.balance_n / cfg.batch_size)  # whole shuffled batches, as released (8 x 128 = 1,024)
                first = torch.cat(index_batches(self.train_idx, cfg.batch_size, seed + 1)[:n])
                with self.autocast():
                    acc = evaluate(self.model, self.train_set, first, cfg, "aux", attack=False, seed=seed + 1)["clean"]
                alpha, beta = auto_balance(acc / 100) if cfg.auto_balance else (cfg.alpha, cfg.beta)
            rec = dict(epoch=self.epoch + 1, lr=self.optimizer.param_groups[0]["lr"], alpha=alpha, beta=beta)
            rec = {k: v for k, v in (rec | dict(balance_acc=acc)).items() if v is not None}
            rec |= self.train_epoch(seed, alpha, beta, start)
            rec |= dict(step=self.step, images_per_s=(self.step - step) * cfg.batch_size / (time.time() - t0))
            self.history.append(rec | ({"batches": self.batch} if self.batch else {}))  # cut short: --resume goes on
            if self.rank == 0:
                self.end_epoch(self.history[-1], t0)

    def summary(self):
        """What trains how, in a few lines; the full config is in config.json and in every checkpoint."""
        cfg = self.cfg
        factor = self.scheduler.lr_lambdas[0]  # per epoch: the schedule of any method, phase by phase
        phases = [list(p) for _, p in itertools.groupby(range(cfg.epochs), factor)]
        spans = [f"epoch {p[0] + 1}" if len(p) == 1 else f"epochs {p[0] + 1}-{p[-1] + 1}" for p in phases]
        lr = ", ".join(f"{cfg.lr * factor(p[0]):.3g} ({span})" for p, span in zip(phases, spans))
        eps = [f"{v * 255:.4g}/255" if cfg.norm == "linf" else f"{v:.4g}" for v in (cfg.eps, cfg.step_size)]
        data = f"{cfg.dataset} ({len(self.train_idx)} training images, {self.classes} classes)"
        sgd = f"{cfg.epochs} epochs, batch {cfg.batch_size}, momentum {cfg.momentum}, weight decay {cfg.weight_decay}"
        lines = [f"{self.label}: {cfg.arch} on {data}", f"device {self.device}, precision {cfg.amp}", f"SGD: {sgd}"]
        lines += [f"lr {lr}", f"attack: PGD-{cfg.attack_steps} {cfg.norm} eps {eps[0]} step {eps[1]}"]
        return "\n".join(lines + [f"out: {self.out} (the full config: config.json)"])

    @contextlib.contextmanager
    def ctrl_c(self):
        """A first Ctrl-C ends training after the current step (last.pt as --max-steps writes it) and says how to
        resume; a second stops at once. Not under torchrun (ranks could stop apart), nor if it is ignored (nohup, &)."""
        handler = signal.getsignal(signal.SIGINT)

        def interrupt(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.stopping = True

        if self.world == 1 and handler is signal.default_int_handler:
            signal.signal(signal.SIGINT, interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, handler)
        if self.stopping:
            where = f"epoch {self.epoch + 1}, step {self.batch}" if self.batch else f"the end of epoch {self.epoch}"
            raise KeyboardInterrupt(f"{self.out / 'last.pt'} holds {where}: add --resume to the command to go on")

    def end_epoch(self, rec, t0):
        """Adds the test figures (under autocast) and the held-out PGD accuracy that selects best.pt (--val-n) to the
        epoch's record; writes last.pt before the log: on resume the checkpoint decides where training goes on."""
        cfg = self.cfg
        final = self.epoch == cfg.epochs or self.step == cfg.max_steps
        with_pgd = rec["epoch"] % cfg.eval_every == 0 and not final  # `report` evaluates the final model in fp32
        with self.autocast():
            if not (self.stopping and self.batch):  # Ctrl-C inside an epoch: the checkpoint at once, no evaluation
                rec |= self.measure(self.model, pgd=with_pgd)
            if cfg.val_n and (with_pgd or final) and not self.stopping:  # held-out training images, never test images
                rec["val_pgd_acc"] = evaluate(self.model, self.train_set, self.val_idx, cfg)["robust"]
        if "val_pgd_acc" in rec and (self.best is None or rec["val_pgd_acc"] > self.best["val_pgd_acc"]):
            self.best = {"epoch": rec["epoch"], "val_pgd_acc": rec["val_pgd_acc"]}
            save_checkpoint(self.state(self.model, best=self.best), self.out / "best.pt")
        state = {k: part.state_dict() for k, part in self.parts().items()} | {k: getattr(self, k) for k in Run.POSITION}
        save_checkpoint(self.state(self.model, **state, rng=rng(self.device)), self.out / "last.pt")
        (self.out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))
        for k, v in rec.items():
            if self.writer is not None and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, rec["epoch"])
        keys = [*"lr alpha loss acc_adv clean_acc clean_acc_aux".split(), f"pgd{cfg.eval_steps}_acc", "val_pgd_acc"]
        shown = " ".join(f"{k} {rec[k]:.4g}" for k in keys if rec.get(k) is not None)
        print(f"epoch {rec['epoch']}/{cfg.epochs} {shown} ({time.time() - t0:.0f} s)", flush=True)

    def measure(self, model, pgd=True, final=False):
        """Test figures of one model: clean accuracy through both BN sets; with `pgd`, PGD accuracy and the feature
        similarity (Table 5); when `final`, PGD through the auxiliary BNs too (Table 8), and AutoAttack (--aa-n)."""
        cfg = self.cfg
        key = f"pgd{cfg.eval_steps}_acc"
        label = f"PGD-{cfg.eval_steps} evaluation"  # progress lines for the passes that attack
        test = (self.test_set, self.test_idx)
        r = evaluate(model, *test, cfg, attack=pgd, label=label if pgd else None)
        m = {"clean_acc": r["clean"]} | ({key: r["robust"], "feature_cos_sim": r["cos"]} if pgd else {})
        aux = evaluate(model, *test, cfg, "aux", final, label=label if final else None) if cfg.split_bn else {}
        m |= {"clean_acc_aux": aux.get("clean")} | ({f"{key}_aux": aux.get("robust")} if final else {})
        if final and cfg.aa_n:
            idx = eval_indices(cfg, self.test_set, cfg.aa_n)
            pgd_same = r["robust"] if idx == self.test_idx else evaluate(model, self.test_set, idx, cfg)["robust"]
            aa = autoattack(model, self.test_set, idx, cfg)
            if aa["acc"] > pgd_same:
                raise EvaluationError(
                    f"AutoAttack accuracy {aa['acc']:.2f}% exceeds PGD-{cfg.eval_steps}'s {pgd_same:.2f}% on the "
                    f"same {aa['n']} images: the stronger attack failed where the weaker one won (gradient masking?)"
                )
            m |= {"aa_acc": aa["acc"], "n_aa": aa["n"], "autoattack": aa}
        return m

    def report(self):
        """The final evaluation (fp32) of the last model (the paper's protocol), of the SWA model and of best.pt,
        written to metrics.json; then --export: the inference model (main BNs only, Sec. 3.3) as a plain state_dict
        that loads with strict=True into build_model(arch, num_classes, split_bn=False), inputs in [0, 1]."""
        cfg = self.cfg
        key = f"pgd{cfg.eval_steps}_acc"
        self.out.mkdir(parents=True, exist_ok=True)
        models = {"": self.model}
        if self.swa is not None and self.swa.n_averaged > 0:
            print(f"SWA: {self.swa.n_averaged.item()} snapshots averaged; estimating their BN statistics", flush=True)
            models["swa_"] = reestimate_bn(self.swa.module, self.train_set, self.train_idx, cfg, self.autocast)
            save_checkpoint(self.state(models["swa_"], n_averaged=self.swa.n_averaged.item()), self.out / "swa.pt")
        if self.best is not None:
            models["best_"] = build_model(cfg.arch, self.classes, cfg.split_bn).to(self.device)
            models["best_"].load_state_dict(read_checkpoint(self.out / "best.pt")[0])
        metrics = {"n_eval": len(self.test_idx)}
        for prefix, model in models.items():
            m = self.measure(model, final=True)
            metrics |= {prefix + k: v for k, v in m.items()}
            aa = f"  AutoAttack {m['aa_acc']:.2f}% on {m['n_aa']}" if cfg.aa_n else ""
            name = {"": "final", "swa_": "SWA"}.get(prefix) or f"best (epoch {self.best['epoch']})"
            print(f"{name}: clean {m['clean_acc']:.2f}%  PGD-{cfg.eval_steps} {m[key]:.2f}%{aa}", flush=True)
        for k in ("grad_sim", "conflict_frac"):  # the run's mean: Table 17's column, Fig. 2b
            if values := [r[k] for r in self.history if k in r]:
                metrics[k] = statistics.fmean(values)
        if not cfg.eval_only:
            metrics |= {"epochs": self.history[-1]["epoch"], "steps": self.step, "method": self.label}
        if self.best:
            metrics |= {"best_epoch": self.best["epoch"], "best_val_pgd_acc": self.best["val_pgd_acc"]}
        metrics |= {"norm": cfg.norm, "eval_eps": cfg.eval_eps, "eval_step_size": cfg.eval_step_size}
        metrics["config"] = dataclasses.asdict(cfg)
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        print(f"-> {self.out / 'metrics.json'}", flush=True)
        if cfg.export:
            Path(cfg.export).parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(merge_split_bn(copy.deepcopy(self.model)).state_dict(), Path(cfg.export))
            print(f"-> {cfg.export} (the inference model: {cfg.arch}, main BNs, {self.classes} classes)", flush=True)
        return metrics

    def benchmark(self):
        """--benchmark N: N timed steps of the method after two warm-up steps, on the run's data; writes nothing."""
        cfg = self.cfg
        sync = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None
        batches = index_batches(self.train_idx, cfg.batch_size, cfg.seed, True, (self.rank, self.world))
        batches = list(itertools.islice(itertools.cycle(batches), cfg.benchmark + 2))
        times = []
        begin = time.time()
        for i, (x, y) in enumerate(self.train_set.batches(batches, 0), 1):
            sync()
            start = time.perf_counter()
            self.train_step(x, y, 0.5, 0.5)
            sync()
            times.append(time.perf_counter() - start)
            progress("benchmark: step", i, len(batches), begin)
        step_s = statistics.median(times[2:])
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            where = torch.cuda.get_device_name(self.device)
        else:  # peak RSS, and the CPU: its model and whether it computes bf16 natively decide CPU timings
            info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
            name = re.search(r"model name\s*:\s*(.*)", info)
            where = f"{name[1] if name else 'CPU'} ({'native' if bf16_supported('cpu') else 'no native'} bf16)"
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"benchmark: {where}, amp={cfg.amp}, arch={cfg.arch}, batch={cfg.batch_size}, steps={cfg.benchmark}")
        img_s = cfg.batch_size / step_s
        line = f"benchmark: method={self.label} step_s={step_s:.4f} img_s={img_s:.1f} peak_mem_mb={peak:.0f}"
        print(line, flush=True)
        return {"step_s": step_s, "img_s": img_s, "peak_mem_mb": peak, "times": times}


def run(cfg: Config, method: Method = ARAT, label=None) -> dict:
    """Train (with --eval-only: only evaluate; with --benchmark: only time) as configured, cfg resolved; returns the
    final metrics. Under torchrun rank 0 evaluates alone, after the others have left."""
    r = Run(cfg, method, label or method_label(cfg))
    if cfg.benchmark:
        return r.benchmark()
    if not cfg.eval_only:
        with r.ctrl_c():
            r.train()
        if r.world > 1:
            dist.barrier()
            dist.destroy_process_group()
            if r.rank:
                return {}
    return r.report()


def main(cfg: Config, setup=None, prog="arat.py") -> dict:
    """Run from parsed flags: bad input ends in one line and exit code 2, an inconsistent evaluation in exit code 3.
    `setup(cfg) -> (resolved cfg, method, label)` is how baselines.py runs its methods through the same loop."""
    try:
        metrics = run(*(setup(cfg) if setup else (resolve(cfg), ARAT, None)))
    except (ConfigError, EvaluationError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ConfigError) else 3) from None
    except RunFinished as e:
        print(f"{prog}: {e}", flush=True)
        return {}
    except KeyboardInterrupt as e:  # from training, it says where last.pt stands
        print(f"\n{prog}: interrupted" + (f"; {e}" if e.args else ""), file=sys.stderr)
        raise SystemExit(130) from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # all written: skip the interpreter's teardown, which gloo can
        print(f"{prog}: rank {os.environ['RANK']} done", flush=True)  # abort ("terminate called without an active
        sys.stderr.flush()  # exception") after the work is complete
        os._exit(0)
    return metrics


if __name__ == "__main__":
    main(parse_args())
