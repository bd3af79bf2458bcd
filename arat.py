"""AR-AT: Asymmetric Representation-regularized Adversarial Training, in one file.

AR-AT adds to adversarial training an invariance loss between adversarial and clean latent features that is made
asymmetric (stop-gradient on the clean side, a predictor MLP on the adversarial side, after SimSiam) and a split
BatchNorm (auxiliary BNs for the clean inputs, used only in training), which removes the "gradient conflict" and the
"mixture distribution" problems of naive invariance regularisation.

    F. Waseda, C.-C. Chang, I. Echizen. Rethinking Invariance Regularization in Adversarial Training to Improve
    Robustness-Accuracy Trade-off. ICLR 2025.

Paper -> code
    Eq. 1      PGD attack (L-inf / L2)                       pgd
    Eqs. 3-7   L_V0..L_V3: three switches                    VARIANTS, train_step
    Eq. 5      why stop-gradient removes the conflict        invariance_loss
    Sec. 3.2   predictor MLP h                               make_predictor
    Sec. 3.3   split BN (main = adversarial, aux = clean)    SplitBatchNorm2d, convert_split_bn, bn_branch
    Eq. 8      auto-balance alpha = Acc, beta = 1 - Acc      auto_balance
    Sec. 3.5   multi-layer invariance, gamma / L per layer   FeatureTap, train_step

Commands
    python arat.py --dataset cifar10 --arch resnet18              # AR-AT, gamma 30, 4 layers of layer4
    python arat.py --dataset cifar10 --arch wrn34 --gamma 100     # AR-AT, gamma 100, 11 layers of layer3
    python arat.py --variant v0 --layers layer4 --no-auto-balance --alpha 1 --beta 1   # Table 17, row (1)

Paper numbers (Table 3, CIFAR-10, last epoch, AutoAttack L-inf 8/255; clean / AA):
    ResNet-18 87.82 / 49.02, WRN-34-10 90.89 / 50.77 (PGD-20: 52.13 and 52.72, Table 6).
"""

import argparse
import contextlib
import copy
import dataclasses
import difflib
import functools
import inspect
import json
import logging
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------------------- Config

# fmt: off
#          stop_grad predictor split_bn     (paper Table 17)
VARIANTS = {"v0": (False, False, False),  # Eq. 3, naive siamese invariance
            "v1": (True, False, False),  # Eq. 4, + stop-gradient
            "v2": (True, True, False),  # Eq. 6, + predictor h
            "v3": (True, True, True)}  # Eq. 7, + split BN: AR-AT
# fmt: on

_WRN_TAPS = tuple(f"layer3.{b}.bn{i}" for b in range(5) for i in (1, 2)) + ("bn",)
#             gamma  regularised layers: ReLU of these outputs, pooled (as released; see README)
ARCHS = {
    "resnet18": (30.0, ("layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2")),
    "preact18": (30.0, ("layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2", "bn")),
    "wrn34": (100.0, _WRN_TAPS),
}
DATASETS = ("cifar10", "cifar100", "imagenette")
# Default threat models (Sec. 4, Appendix E): (eps, step size)
THREATS = {"linf": (8 / 255, 2 / 255), "l2": (0.5, 0.125)}


@dataclass
class Config:
    # experiment
    dataset: str = "cifar10"  # cifar10 | cifar100 | imagenette | a folder with train/ and val/ class subfolders
    arch: str = "resnet18"  # resnet18 | preact18 | wrn34 (Sec. 4, Appendix E)
    out: str | None = None  # output folder; default runs/<dataset>-<arch>-<method>-s<seed> (method: v0..v3, at, ...)
    seed: int = 0  # seeds data order, augmentation, init and attacks
    resume: bool = False  # continue from <out>/last.pt
    device: str | None = None  # cuda | cpu | cuda:1 ...; default cuda if available, else cpu
    amp: str | None = None  # bf16 | fp16 | off; default bf16 where the device supports it, else off
    # data
    data_dir: str = "data"  # where datasets are found, or downloaded to
    download: bool = True  # download CIFAR / Imagenette into --data-dir when missing
    image_size: int | None = None  # side in pixels; 32 for CIFAR, default 160 for Imagenette and folders
    workers: int = 4  # data-loading processes
    # optimisation (Sec. 4)
    epochs: int = 100  # lr is divided by 10 at 75% and 90% of the epochs
    lr: float = 0.1  # SGD learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # on every parameter, predictors and BNs included (as released)
    batch_size: int = 128  # images per step
    max_steps: int | None = None  # stop after this many optimiser steps (smoke runs, timing)
    official_quirks: bool = False  # reproduce the released code's noisy clean batch and lr schedule (README)
    # attack (Eq. 1)
    norm: str = "linf"  # linf | l2 (Appendix E)
    eps: float | None = None  # training budget; default 8/255 (linf), 0.5 (l2); fractions such as 8/255 are accepted
    step_size: float | None = None  # PGD step; default 2/255 (linf), 0.125 (l2)
    attack_steps: int = 10  # PGD steps in training (PGD-10, Sec. 4)
    attack_mode: str = "train"  # train | eval: BN mode during the training attack (released: train, main BN)
    # evaluation
    eval_eps: float | None = None  # test budget; default 8/255 (linf), 0.5 (l2), whatever the training eps
    eval_step_size: float | None = None  # test PGD step; default 2/255 (linf), 0.125 (l2)
    eval_steps: int = 20  # PGD-20 (Sec. 4)
    eval_every: int = 10  # PGD accuracy every this many epochs (and always after the last)
    eval_n: int | None = None  # evaluate on the first N test images; default the whole test split
    aa_n: int = 0  # after training, standard AutoAttack on the first N test images (paper: 10000); 0: off
    log_every: int = 50  # steps between progress lines
    grad_sim_every: int = 0  # measure Grad-sim (Table 17) every this many steps; 0: off (costs two backward passes)
    # AR-AT (Eqs. 3-8, Sec. 3.5)
    variant: str = "v3"  # v0 | v1 | v2 | v3 (Table 17); v3 is AR-AT
    stop_grad: bool | None = None  # sg(z) in the invariance loss (Eq. 4); default from --variant
    predictor: bool | None = None  # predictor MLP h on z' (Eq. 6); default from --variant
    split_bn: bool | None = None  # auxiliary BNs for clean inputs (Eq. 7); default from --variant
    gamma: float | None = None  # invariance weight; default 30 (resnet18, preact18), 100 (wrn34); 0 gives plain AT
    layers: str | None = None  # comma-separated module names regularised (Sec. 3.5); default per arch
    auto_balance: bool = True  # alpha = Acc, beta = 1 - Acc each epoch (Eq. 8)
    alpha: float | None = None  # fixed weight of CE(f(x'), y) with --no-auto-balance; default 1 (Table 6)
    beta: float | None = None  # fixed weight of CE(f_aux(x), y) with --no-auto-balance; default 1 (Table 6)
    balance_n: int = 1000  # training images on which Acc of Eq. 8 is measured (as released)


# fmt: off
# Smallest valid value of each numeric flag, and the flags that must be positive (checked by `resolve`).
MINIMUM = {"epochs": 1, "batch_size": 2, "attack_steps": 1, "eval_steps": 1, "eval_every": 1, "log_every": 1,
           "max_steps": 1, "eval_n": 1, "balance_n": 1, "image_size": 8, "workers": 0, "aa_n": 0,
           "grad_sim_every": 0, "gamma": 0, "alpha": 0, "beta": 0, "weight_decay": 0, "momentum": 0}
POSITIVE = ("lr", "eps", "step_size", "eval_eps", "eval_step_size")
# fmt: on


class ConfigError(ValueError):
    """A bad flag or input: reported as one line and exit code 2, never a traceback."""


def _one_of(flag, value, choices):
    if value not in choices:
        raise ConfigError(f"{flag}: invalid choice {value!r} (choose from {', '.join(choices)})")


def method_label(cfg: Config):
    """The run's name: "at" for plain AT, else the Table 17 preset that the switches match, else the switches."""
    if cfg.gamma == 0 and not cfg.auto_balance and cfg.beta == 0:
        return "at"
    for name, switches in VARIANTS.items():
        if switches == (cfg.stop_grad, cfg.predictor, cfg.split_bn):
            return name
    return f"sg{int(cfg.stop_grad)}-pred{int(cfg.predictor)}-sbn{int(cfg.split_bn)}"


def resolve(cfg: Config) -> Config:
    """Check every flag and fill in the derived defaults, once; returns a new Config."""
    _one_of("--arch", cfg.arch, list(ARCHS))
    _one_of("--variant", cfg.variant, list(VARIANTS))
    _one_of("--norm", cfg.norm, list(THREATS))
    _one_of("--attack-mode", cfg.attack_mode, ["train", "eval"])
    if cfg.amp is not None:
        _one_of("--amp", cfg.amp, ["bf16", "fp16", "off"])
    if cfg.dataset not in DATASETS and not Path(cfg.dataset).is_dir():
        raise ConfigError(
            f"--dataset: {cfg.dataset!r} is neither one of {', '.join(DATASETS)} "
            "nor a folder with train/ and val/ class subfolders"
        )
    for name, low in MINIMUM.items():
        if (value := getattr(cfg, name)) is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least {low}, got {value}")
    for name in POSITIVE:
        if (value := getattr(cfg, name)) is not None and not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be positive, got {value}")
    if cfg.auto_balance and (cfg.alpha is not None or cfg.beta is not None):
        raise ConfigError("--alpha/--beta: fixed weights need --no-auto-balance (auto-balance sets them, Eq. 8)")
    if cfg.dataset in ("cifar10", "cifar100") and cfg.image_size not in (None, 32):
        raise ConfigError(
            f"--image-size: CIFAR images are 32x32, got {cfg.image_size}; resize applies to "
            "imagenette and folder datasets"
        )
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"--device: {device!r} is not a device (examples: cpu, cuda, cuda:1)") from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: CUDA is not available on this machine; use --device cpu")
    if cfg.amp == "fp16" and device_type not in ("cuda", "cpu"):
        raise ConfigError(f"--amp: fp16 is supported on cuda and cpu, not {device_type}")

    sg, pred, split = (
        default if given is None else given
        for given, default in zip((cfg.stop_grad, cfg.predictor, cfg.split_bn), VARIANTS[cfg.variant])
    )
    gamma = ARCHS[cfg.arch][0] if cfg.gamma is None else cfg.gamma
    layers = ARCHS[cfg.arch][1] if cfg.layers is None else tuple(n.strip() for n in cfg.layers.split(",") if n.strip())
    if gamma > 0 and not layers:
        raise ConfigError("--layers: give at least one module name, or --gamma 0 for no invariance term")
    eps, step = THREATS[cfg.norm]
    name = Path(cfg.dataset).name if cfg.dataset not in DATASETS else cfg.dataset
    cfg = dataclasses.replace(
        cfg,
        stop_grad=sg,
        predictor=pred,
        split_bn=split,
        gamma=gamma,
        layers=",".join(layers) if gamma > 0 else "",  # gamma = 0 is plain AT: nothing to capture
        device=device,
        amp=cfg.amp or ("bf16" if bf16_supported(device_type) else "off"),
        image_size=cfg.image_size or (32 if cfg.dataset in ("cifar10", "cifar100") else 160),
        eps=cfg.eps or eps,
        step_size=cfg.step_size or step,
        eval_eps=cfg.eval_eps or eps,
        eval_step_size=cfg.eval_step_size or step,
        alpha=1.0 if cfg.alpha is None else cfg.alpha,
        beta=1.0 if cfg.beta is None else cfg.beta,
    )
    return dataclasses.replace(cfg, out=cfg.out or f"runs/{name}-{cfg.arch}-{method_label(cfg)}-s{cfg.seed}")


def bf16_supported(device_type):
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":  # native bf16 (AVX512-BF16 or AMX) is much faster than fp32; emulated bf16 is slower
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: absent in some torch builds
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the message names the flag
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(text):
    """Floats, and fractions such as 8/255."""
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None


def parse_args(argv=None) -> Config:
    """A flag per Config field: `--batch-size` for `batch_size`; help, groups and defaults read off the Config."""
    parser = _Parser(
        prog="arat.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    group = parser
    for line in inspect.getsource(Config).splitlines()[1:]:
        if m := re.fullmatch(r"    # (\S.*)", line):
            group = parser.add_argument_group(m[1])
        elif m := re.fullmatch(r"    (\w+): [^=]+= (.+?)  # (.*)", line):
            name, default, text = m.groups()
            kind = types[name]
            flag = "--" + name.replace("_", "-")
            text = (f"{text} (default: {default})" if default != "None" else text).replace("%", "%%")
            if kind in (bool, bool | None):
                group.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=getattr(Config, name), help=text
                )
            else:
                base = {int | None: int, float | None: float, str | None: str}.get(kind, kind)
                group.add_argument(
                    flag,
                    type=_number if base is float else base,
                    default=getattr(Config, name),
                    help=text,
                    metavar=name.upper(),
                )
    return Config(**vars(parser.parse_args(argv)))


# --------------------------------------------------------------------------------------------------------------- Models


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
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, SplitBatchNorm2d(child))
        else:
            convert_split_bn(child)
    return model


def merge_split_bn(model: nn.Module) -> nn.Module:
    """The inference model: each SplitBatchNorm2d replaced by its main BN (shares the tensors; deep-copy to detach)."""
    for name, child in model.named_children():
        if isinstance(child, SplitBatchNorm2d):
            setattr(model, name, child.main)
        else:
            merge_split_bn(child)
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
    """3x3 stem (no max-pool), stages of blocks (the first of each later stage has stride 2), avg-pool, linear.

    Post-activation nets put BN-ReLU after the stem; pre-activation nets (PreAct ResNet, WRN) put it before the pool.
    Inputs are in [0, 1]: there is no normalisation layer, as in the released code.
    """

    def __init__(self, block, stem, widths, depths, num_classes, preact):
        super().__init__()
        self.conv1 = conv3x3(3, stem)
        self.bn1 = None if preact else nn.BatchNorm2d(stem)
        cin = stem
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = [block(cin if j == 0 else width, width, 2 if i > 0 and j == 0 else 1) for j in range(depth)]
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


def make_predictor(dim: int) -> nn.Module:
    """h_l (Sec. 3.2): SimSiam's bottleneck MLP with hidden width d/4, applied to the adversarial feature only."""
    return nn.Sequential(
        nn.Linear(dim, dim // 4, bias=False), nn.BatchNorm1d(dim // 4), nn.ReLU(inplace=True), nn.Linear(dim // 4, dim)
    )


class FeatureTap:
    """z_l = global-average-pool(ReLU(output of module l)) for named modules (Sec. 3.5), recorded only inside
    `with tap.capture() as z:`, so attack steps pay nothing. Hooks are registered once, before any torch.compile."""

    def __init__(self, model: nn.Module, names):
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules or not name:
                valid = [
                    n
                    for n, m in modules.items()
                    if n and not isinstance(m, (nn.Conv2d, nn.Linear)) and not re.search(r"\.(main|aux)$", n)
                ]
                close = difflib.get_close_matches(name, valid, n=3)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                raise ConfigError(f"--layers: the model has no module {name!r}; {hint}valid names: {', '.join(valid)}")
            modules[name].register_forward_hook(functools.partial(self._hook, name))
        self.names, self.feats = tuple(names), None

    def _hook(self, name, module, inputs, output):
        if self.feats is None:
            return
        if not torch.is_tensor(output):
            raise ConfigError(f"--layers: module {name!r} returns {type(output).__name__}, not a tensor")
        z = F.relu(output)
        self.feats[name] = z.mean(tuple(range(2, z.dim()))) if z.dim() > 2 else z

    @contextlib.contextmanager
    def capture(self):
        self.feats = {}
        try:
            yield self.feats
        finally:
            self.feats = None

    @torch.no_grad()
    def dims(self, model, image_size, device):
        """Feature width of each tapped layer, from one eval-mode pass (running statistics untouched)."""
        was_training = model.training
        model.eval()
        with self.capture() as z:
            model(torch.zeros(2, 3, image_size, image_size, device=device))
        model.train(was_training)
        return [z[n].shape[1] for n in self.names]


# ----------------------------------------------------------------------------------------------------------------- Data


def _transforms(size, train, resize):
    from torchvision import transforms as T

    steps = [T.Resize(size)] if resize else []  # shorter side to `size` (Imagenette, folders); CIFAR is 32 px
    if train:
        steps += [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()]  # Sec. 4: 4 px padding crop + flip
    elif resize:
        steps += [T.CenterCrop(size)]
    return T.Compose(steps + [T.ToTensor()])  # [0, 1], no mean/std normalisation


def load_data(cfg: Config):
    """(train set with augmentation, test set, number of classes). Downloads CIFAR / Imagenette when missing."""
    from torchvision import datasets

    root, size = cfg.data_dir, cfg.image_size
    resize = cfg.dataset not in ("cifar10", "cifar100")
    train_tf, test_tf = _transforms(size, True, resize), _transforms(size, False, resize)
    if cfg.dataset in DATASETS:
        if cfg.dataset == "imagenette":  # the 160 px release: 9,469 train / 3,925 val images
            url = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"

            def make(train, tf):
                return datasets.Imagenette(root, "train" if train else "val", "160px", cfg.download, tf)
        else:
            url = f"https://www.cs.toronto.edu/~kriz/{cfg.dataset.replace('cifar', 'cifar-')}-python.tar.gz"
            cls = datasets.CIFAR10 if cfg.dataset == "cifar10" else datasets.CIFAR100

            def make(train, tf):
                return cls(root, train=train, download=cfg.download, transform=tf)

        try:
            train, test = make(True, train_tf), make(False, test_tf)
        except (RuntimeError, OSError) as e:  # missing with --no-download, or offline (URLError is an OSError)
            why = "--no-download was given" if not cfg.download else f"downloading it failed ({e})"
            raise ConfigError(
                f"--dataset {cfg.dataset}: not found in {os.path.abspath(root)} and {why}; download "
                f"{url} and extract it there, or point --data-dir at it"
            ) from None
        return train, test, len(train.classes)
    folders = {split: Path(cfg.dataset) / split for split in ("train", "val")}
    for folder in folders.values():
        if not folder.is_dir():
            raise ConfigError(
                f"--dataset: {folder} is missing; a folder dataset needs train/ and val/ "
                "subfolders with one folder of images per class"
            )
    try:
        train = datasets.ImageFolder(folders["train"], train_tf)
        test = datasets.ImageFolder(folders["val"], test_tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise ConfigError(f"--dataset: {e}") from None
    if train.classes != test.classes:
        raise ConfigError(f"--dataset: train/ and val/ of {cfg.dataset} have different class folders")
    return train, test, len(train.classes)


def make_loader(dataset, cfg: Config, train: bool, indices=None):
    from torch.utils.data import DataLoader, Subset

    if indices is not None:
        dataset = Subset(dataset, indices)
    # The generator is re-seeded per epoch (`seed_loader`) so that shuffling and worker augmentation seeds depend
    # only on (seed, epoch): a resumed run sees the same batches as an uninterrupted one.
    return DataLoader(
        dataset,
        cfg.batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=cfg.workers,
        pin_memory=cfg.device.startswith("cuda"),
        generator=torch.Generator(),
    )


def seed_loader(loader, seed):
    loader.generator.manual_seed(seed)
    return loader


# --------------------------------------------------------------------------------------------------------------- Attack


def _project(delta, eps, norm):
    if norm == "linf":
        return delta.clamp(-eps, eps)
    scale = eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * scale.clamp(max=1).view(-1, *[1] * (delta.dim() - 1))


def pgd(model, x, y, eps, step_size, steps, norm="linf", random_start=True):
    """Eq. 1 by projected gradient ascent on CE(f(x + delta), y): returns x' with ||x' - x|| <= eps and x' in [0, 1].

    Never modifies x (the released code added its random start to the caller's batch in place). Gradients are taken
    with respect to delta only, so autograd runs no weight-gradient kernel and accumulates nothing in .grad (freezing
    the weights as well changed PGD-10 time by 2% in a measured ResNet-18 run).
    """
    view = (-1, *[1] * (x.dim() - 1))
    if not random_start:
        delta = torch.zeros_like(x)
    elif norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:  # uniform radius along a random direction
        delta = torch.randn_like(x)
        delta *= eps * torch.rand(len(x), device=x.device).view(view) / delta.flatten(1).norm(dim=1).view(view)
    delta = (x + delta).clamp(0, 1) - x
    # Under fp16 autocast the backward pass through confident logits underflows to exact zeros; scaling the loss
    # keeps the direction (sign / normalised gradient are scale-free), as GradScaler does for weight gradients.
    fp16 = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == torch.float16
    scale = 1024.0 if fp16 else 1.0
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss * scale, delta)
        if norm == "linf":
            step = grad.sign()
        else:
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
        delta = _project(delta.detach() + step_size * step, eps, norm)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


# --------------------------------------------------------------------------------------------------------------- Losses


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
    return 1 - F.cosine_similarity(predictor(z_adv).float(), target.float(), dim=1).mean()


def auto_balance(acc: float):
    """Eq. 8: alpha = Acc, beta = 1 - Acc, with Acc the clean accuracy of f^auxBN measured before the epoch."""
    return acc, 1.0 - acc


@contextlib.contextmanager
def train_mode(model, training):
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


def train_step(model, predictors, tap, x, y, cfg: Config, alpha, beta):
    """Eq. 7 (Eqs. 3, 4, 6 with the switches off): returns the total loss and its terms for logging."""
    if cfg.official_quirks:  # released code: the clean batch and the attack's centre carry PGD's random start
        x = (x + torch.empty_like(x).uniform_(-cfg.eps, cfg.eps)).clamp(0, 1)
    with train_mode(model, cfg.attack_mode == "train"):  # as released: train mode, main BN, features off
        x_adv = pgd(model, x, y, cfg.eps, cfg.step_size, cfg.attack_steps, cfg.norm)
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
    if tap.names:  # gamma is shared evenly over the L layers (Sec. 3.5)
        inv = sum(invariance_loss(z_adv[n], z[n], h, cfg.stop_grad) for n, h in zip(tap.names, predictors, strict=True))
        terms["inv"] = inv / len(tap.names)
        loss = loss + cfg.gamma * terms["inv"]
    return loss, terms


def gradient_similarity(cls_loss, inv_loss, weights):
    """Grad-sim of Table 17 / Fig. 2: cosine between the gradients of the classification loss
    (alpha CE' + beta CE) and of the invariance loss w.r.t. the Conv2d/Linear weights, and the fraction of those
    weights whose two gradients have opposite signs ("gradient conflict")."""
    g_cls = torch.autograd.grad(cls_loss, weights, retain_graph=True, allow_unused=True)
    g_inv = torch.autograd.grad(inv_loss, weights, retain_graph=True, allow_unused=True)
    pairs = [
        (a.flatten().float(), b.flatten().float()) for a, b in zip(g_cls, g_inv) if a is not None and b is not None
    ]
    a, b = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])  # layers after the taps get no inv grad
    return F.cosine_similarity(a, b, dim=0), (a * b < 0).float().mean()


def lr_factor(epoch: int, epochs: int, official_quirks: bool = False) -> float:
    """Sec. 4: lr / 10 at 75% and at 90% of training (epochs 75 and 90 of 100); `epoch` counts from 0."""
    if official_quirks:  # released: epoch 1 at lr / 5, then the schedule one epoch late
        if epoch == 0:
            return 0.2
        epoch -= 1
    return 0.1 ** ((epoch >= round(0.75 * epochs)) + (epoch >= round(0.9 * epochs)))


# ----------------------------------------------------------------------------------------------------- Train / evaluate


@torch.no_grad()
def clean_accuracy(model, loader, device, branch="main"):
    """Percent correct in eval mode through the main BNs (inference, Sec. 3.3) or the auxiliary ones (Table 8)."""
    correct = total = 0
    with train_mode(model, False), bn_branch(model, branch):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            correct += (model(x).argmax(1) == y).sum()
            total += len(y)
    return 100.0 * float(correct) / max(total, 1)


def robust_accuracy(model, loader, device, eps, step_size, steps, norm, show_progress=False):
    """Percent correct under PGD in eval mode through the main BNs (the paper's PGD-20 protocol)."""
    correct = total = 0
    progress = Progress(len(loader), 0, loader.batch_size) if show_progress else None
    with train_mode(model, False):
        for i, (x, y) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x_adv = pgd(model, x, y, eps, step_size, steps, norm)
            with torch.no_grad():
                correct += (model(x_adv).argmax(1) == y).sum()
            total += len(y)
            if progress and ((i + 1) % max(1, len(loader) // 10) == 0 or i + 1 == len(loader)):
                progress.update(i + 1, f"PGD-{steps} evaluation: batch {i + 1}/{len(loader)}")
    if progress:
        progress.end_line()
    return 100.0 * float(correct) / max(total, 1)


def load_autoattack():
    """AutoAttack (Croce & Hein, 2020): the original package (`autoattack`, installed from its repository) when
    present, else its PyPI repackaging `pyautoattack`, whose API is keyword-only."""
    try:
        from autoattack import AutoAttack

        return AutoAttack, True
    except ImportError:
        from pyautoattack import AutoAttack

        return AutoAttack, False


def autoattack_accuracy(model, loader, device, eps, norm, n):
    """Percent of the first n images of `loader` still correct under standard AutoAttack, main BNs, fp32."""
    AutoAttack, original = load_autoattack()
    log = logging.getLogger("auto-attack")  # where pyautoattack reports each attack's progress
    if not original and not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stdout))
        log.setLevel(logging.DEBUG)
    xs, ys = zip(*[(x, y) for x, y in loader])
    x, y = torch.cat(xs)[:n], torch.cat(ys)[:n]
    with train_mode(model, False):
        adversary = AutoAttack(
            model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version="standard", device=device
        )
        if original:
            _, y_adv = adversary.run_standard_evaluation(x, y, bs=loader.batch_size, return_labels=True)
        else:
            _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=loader.batch_size)
    return 100.0 * (y_adv.cpu() == y).float().mean().item()


def save_checkpoint(state: dict, path: Path):
    """Write to a temporary file, then rename: an interrupted save never destroys the previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class Progress:
    """The live line: rewritten in place on a terminal, one line per update in a log file; images/s and ETA."""

    def __init__(self, total_steps, step, batch_size):
        self.total, self.batch_size, self.tty = total_steps, batch_size, sys.stdout.isatty()
        self.start, self.step0 = time.time(), step
        self.last_time, self.last_step = self.start, step

    def update(self, step, text):
        now = time.time()
        rate = (step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
        eta = (self.total - step) * (now - self.start) / max(step - self.step0, 1)
        line = f"{text} | {rate:.0f} img/s | ETA {self.clock(eta)}"
        print(f"\r{line}", end="", flush=True) if self.tty else print(line, flush=True)
        self.last_time, self.last_step = now, step

    def end_line(self):
        if self.tty:
            print()

    @staticmethod
    def clock(seconds):
        seconds = int(seconds)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_epoch(parts, tap, loader, autocast, cfg, alpha, beta, step, progress, epoch):
    """One epoch of Eq. 7 steps; returns the epoch's mean loss terms (accuracies in percent) and the step count."""
    model, predictors, optimizer, scaler = (parts[k] for k in ("model", "predictors", "optimizer", "scaler"))
    model.train()
    predictors.train()
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]  # theta of Grad-sim
    sums, sims, n = {}, [], 0
    for i, (x, y) in enumerate(loader):
        x, y = x.to(cfg.device, non_blocking=True), y.to(cfg.device, non_blocking=True)
        with autocast():
            loss, terms = train_step(model, predictors, tap, x, y, cfg, alpha, beta)
        if cfg.grad_sim_every and step % cfg.grad_sim_every == 0 and "inv" in terms:
            cls_loss = alpha * terms["ce_adv"] + beta * terms.get("ce_clean", 0)
            sims.append(torch.stack(gradient_similarity(cls_loss, terms["inv"], weights)))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step, n = step + 1, n + 1
        for k, v in {"loss": loss, **terms}.items():  # summed on the device: the host syncs only at log points
            sums[k] = sums.get(k, 0) + v.detach().float()
        stop = step == cfg.max_steps
        if step % cfg.log_every == 0 or i + 1 == len(loader) or stop:
            m = {k: (v / n).item() for k, v in sums.items()}
            terms_text = (
                f"loss {m['loss']:.3f} ce' {m['ce_adv']:.3f} ce {m.get('ce_clean', 0):.3f} inv {m.get('inv', 0):.3f}"
            )
            progress.update(
                step,
                f"ep {epoch + 1}/{cfg.epochs} step {i + 1}/{len(loader)} | {terms_text} | a {alpha:.3f} b {beta:.3f}",
            )
        if stop:
            break
    progress.end_line()
    means = {k: (v / n).item() * (100 if k.startswith("acc") else 1) for k, v in sums.items()}
    if sims:
        means["grad_sim"], means["conflict_frac"] = torch.stack(sims).mean(0).tolist()
    return means, step


def rng_states(device):
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda}


# Flags that may differ when a run is resumed; any other difference from the checkpoint's config is refused.
RESUMABLE_CHANGES = set("resume device workers log_every max_steps eval_every eval_n aa_n grad_sim_every".split())
RESUMABLE_CHANGES |= {"data_dir", "download"}


def load_checkpoint(path, cfg, parts):
    """Restore every part (model, predictors, optimizer, scheduler, scaler) and the RNGs.

    Returns the number of finished epochs, of optimiser steps, and the last epoch's log record."""
    ckpt = torch.load(path, map_location=cfg.device, weights_only=False)
    for k, v in ckpt["config"].items():
        if k not in RESUMABLE_CHANGES and getattr(cfg, k) != v:
            flag, now = "--" + k.replace("_", "-"), getattr(cfg, k)
            raise ConfigError(f"--resume: {path} was trained with {flag} {v}, not {now}; resume with the same settings")
    for name, part in parts.items():
        part.load_state_dict(ckpt[name])
    torch.set_rng_state(ckpt["rng"]["torch"].cpu())
    random.setstate(ckpt["rng"]["python"])
    if ckpt["rng"]["cuda"] is not None and cfg.device.startswith("cuda"):
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
    return ckpt["epoch"], ckpt["step"], ckpt["record"]


def run(cfg: Config) -> dict:
    """Train as configured (cfg already resolved); write <out>/log.jsonl, last.pt and metrics.json."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.out)
    ckpt_path = out / "last.pt"
    if cfg.resume and not ckpt_path.exists():
        raise ConfigError(f"--resume: there is no checkpoint at {ckpt_path}")
    if not cfg.resume and ckpt_path.exists():
        raise ConfigError(f"--out: {out} already holds a run; add --resume to continue it, or choose another --out")
    train_set, test_set, num_classes = load_data(cfg)
    if cfg.aa_n and num_classes < 10:
        raise ConfigError(f"--aa-n: standard AutoAttack needs at least 10 classes (9 targets), not {num_classes}")

    device = torch.device(cfg.device)
    model = build_model(cfg.arch, num_classes, cfg.split_bn).to(device)
    tap = FeatureTap(model, cfg.layers.split(",") if cfg.layers else [])
    dims = tap.dims(model, cfg.image_size, device)
    predictors = nn.ModuleList(make_predictor(d) if cfg.predictor else nn.Identity() for d in dims).to(device)
    params = [*model.parameters(), *predictors.parameters()]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    schedule = functools.partial(lr_factor, epochs=cfg.epochs, official_quirks=cfg.official_quirks)
    # One place for precision: bf16 autocast needs no loss scaling; fp16 needs GradScaler (and pgd scales its loss).
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    parts = {
        "model": model,
        "predictors": predictors,
        "optimizer": optimizer,
        "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        "scaler": torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"),
    }  # everything last.pt holds
    start_epoch, step, record = load_checkpoint(ckpt_path, cfg, parts) if cfg.resume else (0, 0, None)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    logged = [json.loads(line)["epoch"] for line in log_path.open()] if log_path.exists() else []
    if start_epoch and start_epoch not in logged:  # the run stopped between a checkpoint and its log line
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    print(json.dumps(dataclasses.asdict(cfg), indent=1), flush=True)

    train_loader = make_loader(train_set, cfg, train=True)
    if len(train_loader) == 0:
        raise ConfigError(f"--batch-size: {cfg.batch_size} is larger than the {len(train_set)} training images")
    test_loader = make_loader(test_set, cfg, train=False, indices=range(min(cfg.eval_n or math.inf, len(test_set))))
    progress = Progress(min(cfg.epochs * len(train_loader), cfg.max_steps or math.inf), step, cfg.batch_size)
    pgd_key = f"pgd{cfg.eval_steps}_acc"

    def evaluate(with_pgd, final):
        # The reported (last) evaluation runs in fp32 so that it does not depend on the training precision.
        with contextlib.nullcontext() if final else autocast():
            rec = {"clean_acc": clean_accuracy(model, test_loader, device, "main")}
            rec["clean_acc_aux"] = clean_accuracy(model, test_loader, device, "aux") if cfg.split_bn else None
            if with_pgd:
                attack = (cfg.eval_eps, cfg.eval_step_size, cfg.eval_steps, cfg.norm)
                rec[pgd_key] = robust_accuracy(model, test_loader, device, *attack, show_progress=True)
        return rec

    for epoch in range(start_epoch, cfg.epochs):
        if cfg.max_steps and step >= cfg.max_steps:
            break
        epoch_start, seed = time.time(), cfg.seed * 1_000_003 + epoch
        # Eq. 8 with Acc of the model before this epoch, in eval mode through the auxiliary BNs, on ~1000 augmented
        # training images as released (epoch 1 starts near chance, so beta ~ 1 at first). They are drawn afresh each
        # epoch: folder datasets are stored class by class, so "the first 1000" would be one or two classes.
        sample = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[: cfg.balance_n]
        balance_loader = seed_loader(make_loader(train_set, cfg, train=False, indices=sample.tolist()), seed)
        with autocast():
            acc = clean_accuracy(model, balance_loader, device, "aux") / 100
        alpha, beta = auto_balance(acc) if cfg.auto_balance else (cfg.alpha, cfg.beta)
        lr = optimizer.param_groups[0]["lr"]

        train_start, step_before = time.time(), step
        loader = seed_loader(train_loader, seed)
        means, step = train_epoch(parts, tap, loader, autocast, cfg, alpha, beta, step, progress, epoch)
        images_per_s = (step - step_before) * cfg.batch_size / (time.time() - train_start)
        parts["scheduler"].step()

        final = epoch + 1 == cfg.epochs or step == cfg.max_steps
        with_pgd = (epoch + 1) % cfg.eval_every == 0 or final
        rec = dict(epoch=epoch + 1, step=step, lr=lr, alpha=alpha, beta=beta, balance_acc=100 * acc)
        rec |= means | evaluate(with_pgd, final) | dict(images_per_s=images_per_s, time=time.time() - progress.start)
        # The checkpoint first: on resume it decides where training continues; the log only reports.
        state = {name: part.state_dict() for name, part in parts.items()}
        state |= dict(epoch=epoch + 1, step=step, config=dataclasses.asdict(cfg), num_classes=num_classes, record=rec)
        save_checkpoint(state | {"rng": rng_states(device)}, ckpt_path)
        with log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        record = rec
        aux = "  n/a " if rec["clean_acc_aux"] is None else f"{rec['clean_acc_aux']:5.2f}%"
        robust = f"  PGD-{cfg.eval_steps} {rec[pgd_key]:5.2f}%" if with_pgd else ""
        print(
            f"epoch {epoch + 1:3d}/{cfg.epochs}  lr {lr:.4f}  a {alpha:.3f}  loss {rec['loss']:.3f}  train adv "
            f"{rec['acc_adv']:5.1f}%  test clean {rec['clean_acc']:5.2f}% (aux {aux}){robust}  "
            f"{Progress.clock(time.time() - epoch_start)}",
            flush=True,
        )

    # From the last epoch's record, which always has a PGD evaluation.
    metrics = {k: record[k] for k in ("clean_acc", "clean_acc_aux", pgd_key)} | {"n_eval": len(test_loader.dataset)}
    metrics |= dict(norm=cfg.norm, eval_eps=cfg.eval_eps, eval_step_size=cfg.eval_step_size, epochs=record["epoch"])
    metrics |= dict(steps=record["step"], method=method_label(cfg), config=dataclasses.asdict(cfg))
    summary = f"clean {metrics['clean_acc']:.2f}%  PGD-{cfg.eval_steps} {metrics[pgd_key]:.2f}% on {metrics['n_eval']}"
    if cfg.aa_n:
        aa_loader = make_loader(test_set, cfg, train=False, indices=range(min(cfg.aa_n, len(test_set))))
        metrics["aa_acc"] = autoattack_accuracy(model, aa_loader, device, cfg.eval_eps, cfg.norm, cfg.aa_n)
        metrics["n_aa"] = len(aa_loader.dataset)
        summary += f"  AutoAttack {metrics['aa_acc']:.2f}% on {metrics['n_aa']}"
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"final: {summary} test images -> {out / 'metrics.json'}", flush=True)
    return metrics


def main(cfg: Config) -> dict:
    try:
        return run(resolve(cfg))
    except ConfigError as e:
        print(f"arat.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(
            "\narat.py: interrupted; the last finished epoch is in last.pt: add --resume to continue", file=sys.stderr
        )
        raise SystemExit(130) from None


if __name__ == "__main__":
    main(parse_args())
