"""baselines.py: the defenses AR-AT is compared with (paper Tables 3, 4 and 16), on arat.py's core.

Each method is an attack and a loss, registered in METHODS, with its formula beside it; everything else (data, models,
evaluation with PGD-20 and AutoAttack, outputs, resume, --eval-only, --export, precision) is arat.py's. Every method is
evaluated with AR-AT's protocol: the last epoch, PGD-20 at 8/255 with step 2/255, AutoAttack at 8/255.

    python baselines.py --method trades --dataset cifar10 --arch resnet18 --aa-n 10000
    python baselines.py --method mart --recipe arat       # any method with AR-AT's recipe, for a like-for-like run
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import arat
from arat import arg

# ------------------------------------------------------------------------------------------------------------- Recipes

# Each method's official recipe, from the file named beside it (the README's table gives each value's source). lr_drops:
# epochs (counted from 0) after which the lr is divided by 10: an official "epoch >= d" over 1-based epochs is d - 1
# here. --recipe arat trains any method with AR-AT's optimisation and attack budget (Sec. 4), its weights unchanged.
# fmt: off
RECIPES = {
    "arat":       dict(epochs=100, lr=0.1, weight_decay=5e-4, eps=8 / 255, step_size=2 / 255, attack_steps=10),
    # MadryLab robustness's CIFAR defaults (the paper's AT implementation was aligned with them), PGD-7
    "at":         dict(epochs=150, lr=0.1, lr_drops="50,100", weight_decay=5e-4, eps=8 / 255, step_size=2 / 255,
                       attack_steps=7),
    # yaodongyu/TRADES, train_trades_cifar10.py (argparse defaults, adjust_learning_rate)
    "trades":     dict(epochs=76, lr=0.1, lr_drops="74,89,99", weight_decay=2e-4, eps=0.031, step_size=0.007,
                       attack_steps=10, trades_beta=6.0),
    # YisenWang/MART, train_resnet.py (every architecture but WRN-34-10) and train_wideresnet.py
    "mart":       dict(epochs=120, lr=0.01, lr_drops="74,89,99", weight_decay=3.5e-3, eps=0.031, step_size=0.007,
                       attack_steps=10, trades_beta=5.0),
    "mart-wrn34": dict(epochs=90, lr=0.1, lr_drops="74,89,99", weight_decay=7e-4, eps=0.031, step_size=0.007,
                       attack_steps=10, trades_beta=6.0),
    # dvlab-research/LBGAT, train_lbgat_cifar100.py (epoch 1 at the literal 0.02) and sh/train_lbgat0_cifar100.sh
    "lbgat":      dict(epochs=100, lr=0.1, warmup_lr=0.02, lr_drops="75,90,100", weight_decay=2e-4, eps=0.031,
                       step_size=0.007, attack_steps=10, trades_beta=0.0),
}
# fmt: on
AR_AT_ONLY = ("variant", "stop_grad", "predictor", "split_bn", "gamma", "layers")  # refused when given


@dataclasses.dataclass
class BaselineConfig(arat.Config):
    """arat.py's flags, with the recipe's ones defaulting to the method's official recipe, and these."""

    epochs: int | None = arg(None, "training epochs; default the recipe's", "optimisation (Sec. 4)")
    lr: float | None = arg(None, "SGD learning rate; default the recipe's")
    weight_decay: float | None = arg(None, "on every parameter; default the recipe's")
    official_quirks: bool = arg(False, "arat.py only: refused here")
    attack_steps: int | None = arg(None, "attack steps in training; default the recipe's")
    variant: str | None = arg(None, "arat.py only: refused here", "AR-AT (arat.py; these are refused here, except "
                              "--auto-balance, --alpha, --beta, --balance-n for asym-trades)")  # fmt: skip
    method: str = arg("trades", "at | trades | mart | lbgat | asym-trades", "baselines (Tables 3, 4, 16)")
    recipe: str = arg("official", "official: the method's official recipe (README) | arat: AR-AT's (Sec. 4)")
    trades_beta: float | None = arg(None, "weight of the KL term of TRADES, MART, LBGAT; default the recipe's")
    asym_lambda: float = arg(6.0, "weight of Asym-TRADES's KL term (Appendix F)")


# -------------------------------------------------------------------------------------------------------------- Attacks
# Each is arat.pgd with the official objective and start (fp16 loss scaling, frozen weights and the torchrun sharding
# of the random start live there). pgd steps delta = x' - x, where the official loops step x' itself: equal up to the
# rounding of the last bit.


def budget(cfg):
    """The training attack's eps, step size, number of steps and norm."""
    return cfg.eps, cfg.step_size, cfg.attack_steps, cfg.norm


def at_attack(model, extra, x, y, cfg, shard=(0, 1)):
    """AT's (ndb796/Pytorch-Adversarial-Training-CIFAR, pgd_adversarial_training.py, LinfPGDAttack.perturb): sign
    steps on the batch-mean CE from x + U(-eps, eps), not clamped into [0, 1] before the first gradient, in train mode
    (train() calls it on the train-mode net: the BN running statistics absorb its forward passes)."""
    start = "unclamped" if cfg.norm == "linf" else "uniform"
    with arat.train_mode(model, cfg.attack_mode == "train"):
        return x, arat.pgd(model, x, y, *budget(cfg), start, shard, F.cross_entropy)


def trades_attack(model, extra, x, y, cfg, shard=(0, 1)):
    """TRADES's (yaodongyu/TRADES, trades.py, trades_loss) and LBGAT's (dvlab-research/LBGAT, lbgat.py, lbgat_loss):
    sign steps on KL(p(x) || p(x')) summed over the batch, from x + 0.001 N(0, 1), in eval mode. p(x) is computed
    once per batch, not at every step as officially: in eval mode the model does not change during the attack, so the
    examples are the same, at 30 forward-pass equivalents per TRADES step instead of 39."""
    with arat.train_mode(model, False):
        with torch.no_grad():
            p = F.softmax(model(x), dim=1)

        def objective(logits, y):
            return F.kl_div(logits.log_softmax(1), p, reduction="sum")

        return x, arat.pgd(model, x, y, *budget(cfg), "normal", shard, objective)


def mart_attack(model, extra, x, y, cfg, shard=(0, 1)):
    """MART's (YisenWang/MART, mart.py, mart_loss): sign steps on the batch-mean CE from x + 0.001 N(0, 1), eval mode."""
    with arat.train_mode(model, False):
        return x, arat.pgd(model, x, y, *budget(cfg), "normal", shard, F.cross_entropy)


# --------------------------------------------------------------------------------------------------------------- Losses
# The order of the train-mode forward passes decides the BN running statistics: each loss keeps its official order.


def kl(p_logits, q_logits):
    """KL(p || q), summed over classes and averaged over the batch, with gradient to both sides (as in TRADES)."""
    return F.kl_div(q_logits.log_softmax(1), p_logits.softmax(1), reduction="batchmean")


def at_loss(model, extra, x, x_adv, y, cfg, alpha, beta):
    """AT (Madry et al., 2018; pgd_adversarial_training.py, train): CE(f(x'), y), on the PGD examples only."""
    logits_adv = model(x_adv)
    ce_adv = F.cross_entropy(logits_adv, y)
    return ce_adv, {"ce_adv": ce_adv, "acc_adv": (logits_adv.argmax(1) == y).float().mean()}


def trades_loss(model, extra, x, x_adv, y, cfg, alpha, beta):
    """TRADES (Zhang et al., 2019; yaodongyu/TRADES, trades.py, trades_loss): CE(f(x), y) + beta KL(p(x) || p(x'))."""
    logits = model(x)
    # trades.py's three train-mode forwards, in its order: model(x) for the CE, then, for the KL, model(x') and
    # model(x) again, whose values equal the first's but which moves the BN running statistics once more
    logits_adv = model(x_adv)
    reg = kl(model(x), logits_adv)
    ce = F.cross_entropy(logits, y)
    terms = {"ce_clean": ce, "acc_clean": (logits.argmax(1) == y).float().mean(), "kl": reg}
    return ce + cfg.trades_beta * reg, terms | {"acc_adv": (logits_adv.argmax(1) == y).float().mean()}


def mart_loss(model, extra, x, x_adv, y, cfg, alpha, beta):
    """MART (Wang et al., 2020; YisenWang/MART, mart.py, mart_loss): BCE(f(x'), y) + beta / B sum_i KL_i(p(x) ||
    p(x')) (1 - p_y(x_i)), where BCE(f(x'), y) = CE(f(x'), y) - log(1 - max_{k != y} p_k(x')). Clean, then
    adversarial forward, as officially."""
    logits, logits_adv = model(x), model(x_adv)
    p, p_adv = logits.softmax(1), logits_adv.softmax(1)
    top2 = p_adv.argsort(1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])  # the most likely wrong class
    ce_adv = F.cross_entropy(logits_adv, y)
    bce = ce_adv + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
    kl_i = F.kl_div(torch.log(p_adv + 1e-12), p, reduction="none").sum(1)
    reg = (kl_i * (1.0000001 - p.gather(1, y[:, None]).squeeze(1))).mean()
    terms = {"ce_adv": ce_adv, "acc_adv": (logits_adv.argmax(1) == y).float().mean(), "bce": bce}
    return bce + cfg.trades_beta * reg, terms | {"kl_weighted": reg}


def lbgat_loss(model, teacher, x, x_adv, y, cfg, alpha, beta):
    """LBGAT (Cui et al., 2021; dvlab-research/LBGAT, lbgat.py, lbgat_loss): MSE(f(x'), g(x)) + CE(g(x), y) + beta
    KL(p(x) || p(x')) (beta = 0 in the paper's runs), with g a clean-trained teacher trained jointly: both of its
    terms reach it."""
    # lbgat.py's train-mode forwards, in its order: f(x'), f(x), g(x). f(x) runs even with beta = 0, where the KL
    # enters as 0 KL: it adds nothing to the gradient but moves the student's BN running statistics
    logits_adv = model(x_adv)
    logits = model(x)
    logits_teacher = teacher(x)
    mse = F.mse_loss(logits_adv, logits_teacher)
    ce_teacher = F.cross_entropy(logits_teacher, y)
    reg = kl(logits, logits_adv)
    terms = {"ce_adv": F.cross_entropy(logits_adv, y), "acc_adv": (logits_adv.argmax(1) == y).float().mean()}
    return mse + ce_teacher + cfg.trades_beta * reg, terms | {"ce_teacher": ce_teacher, "mse": mse, "kl": reg}


def lbgat_teacher(model, cfg):
    """LBGAT's teacher whatever the student: ResNet18_cifar of dvlab-research/LBGAT (models/resnetcifar.py), built from
    arat.py's blocks. Unlike arat.py's ResNet-18, its layer2 keeps stride 1, so its feature maps are 32/32/16/8 on
    CIFAR (arat.py's: 32/16/8/4): the same parameters at 3.2x the FLOPs (README). Its avg_pool2d(8) is the global
    average of those 8x8 maps; arat.py's global pooling equals it there and serves other image sizes too. Single BN,
    always in train mode as officially, trained by the same optimiser."""
    widths, classes = (64, 128, 256, 512), model.fc.out_features
    return arat.CifarResNet(arat.BasicBlock, 64, widths, (2, 2, 2, 2), classes, preact=False, strides=(1, 1, 2, 2))


def asym_trades_loss(model, extra, x, x_adv, y, cfg, alpha, beta):
    """Asym-TRADES (Appendix F, Table 15): alpha CE(f(x'), y) + beta CE(f_aux(x), y) + lambda KL(sg(p_aux(x)) || p(x')),
    AR-AT with TRADES's logit-level term in place of the feature-level one: split BN, auto-balance, no predictor.
    The KL computed is KL(sg(p_aux(x)) || p(x')), TRADES's direction: Table 15 writes its arguments as (f(x'),
    sg(f_aux(x))), the pair compared, and as in TRADES the clean distribution is the target that p(x') is pulled
    towards; the stop-gradient keeps the auxiliary branch out of the KL's gradient."""
    logits_adv = model(x_adv)
    with arat.bn_branch(model, "aux"):
        logits = model(x)
    ce_adv, ce = F.cross_entropy(logits_adv, y), F.cross_entropy(logits, y)
    reg, cls = kl(logits.detach(), logits_adv), alpha * ce_adv + beta * ce
    terms = {"ce_adv": ce_adv, "ce_clean": ce, "cls": cls, "kl": reg}
    terms |= {
        "acc_adv": (logits_adv.argmax(1) == y).float().mean(),
        "acc_clean": (logits.argmax(1) == y).float().mean(),
    }
    return cls + cfg.asym_lambda * reg, terms


def nothing(model, cfg):
    return nn.Module()


# Only Asym-TRADES weighs alpha and beta (Eq. 8); Grad-sim (Fig. 11) compares each method's own two terms.
METHODS = {
    "at": arat.Method("at", at_attack, at_loss, nothing, balance=False),
    "trades": arat.Method("trades", trades_attack, trades_loss, nothing, False, ("ce_clean", "kl")),
    "mart": arat.Method("mart", mart_attack, mart_loss, nothing, False, ("bce", "kl_weighted")),
    "lbgat": arat.Method("lbgat", trades_attack, lbgat_loss, lbgat_teacher, balance=False),
    "asym-trades": arat.Method("asym-trades", arat.arat_attack, asym_trades_loss, nothing, True, ("cls", "kl")),
}


# ----------------------------------------------------------------------------------------------------------------- Main


def setup(cfg: BaselineConfig):
    """The recipe's values for every recipe flag not given, then arat.py's checks: (cfg, method, run name)."""
    arat._one_of("--method", cfg.method, list(METHODS))
    arat._one_of("--recipe", cfg.recipe, ["official", "arat"])
    asym = cfg.method == "asym-trades"
    if cfg.official_quirks:
        raise arat.ConfigError("--official-quirks: reproduces AR-AT's released code; arat.py only")
    for name in AR_AT_ONLY + (() if asym else ("alpha", "beta")):  # rather than silently replaced
        if (value := getattr(cfg, name)) is not None:
            flag = ("--no-" if value is False else "--") + name.replace("_", "-")
            raise arat.ConfigError(f"{flag}: an AR-AT flag, which --method {cfg.method} does not take (arat.py)")
    official = RECIPES["mart-wrn34" if (cfg.method, cfg.arch) == ("mart", "wrn34") else cfg.method] if not asym else {}
    recipe = dict(official)
    if cfg.recipe == "arat" or asym:  # AR-AT's optimisation and attack budget; the method's own weight stays
        recipe = RECIPES["arat"] | {k: v for k, v in official.items() if k == "trades_beta"}
    recipe |= {"lr": 0.01} if cfg.method == "lbgat" and cfg.dataset == "imagenette" else {}  # Table 4: 0.1 diverged
    if cfg.norm == "l2":  # the recipes' budgets are L-inf ones; L2 keeps arat.py's (0.5, step 0.125)
        recipe = {k: v for k, v in recipe.items() if k not in ("eps", "step_size")}
    epochs = recipe["epochs"] if cfg.epochs is None else cfg.epochs
    if "lr_drops" in recipe:  # as arat.py's: a shorter or longer run drops at the same fractions of it
        drops = [round(int(d) * epochs / recipe["epochs"]) for d in recipe["lr_drops"].split(",")]
        recipe["lr_drops"] = ",".join(str(d) for d in drops)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in recipe.items() if getattr(cfg, k) is None})
    cfg = dataclasses.replace(cfg, trades_beta=6.0 if cfg.trades_beta is None else cfg.trades_beta)
    # AR-AT's own switches: only Asym-TRADES has split BN and auto-balance; no method has the feature-level term
    cfg = dataclasses.replace(
        cfg, variant="v3", gamma=0.0, layers="", predictor=False, split_bn=asym, auto_balance=asym and cfg.auto_balance
    )
    cfg = arat.resolve(cfg, label=lambda c: c.method + ("-arat-recipe" if c.recipe == "arat" and not asym else ""))
    return cfg, METHODS[cfg.method], cfg.method


if __name__ == "__main__":
    args = arat.parse_args(config=BaselineConfig, prog="baselines.py", description=__doc__.split("\n\n")[0])
    arat.main(args, setup, "baselines.py")
