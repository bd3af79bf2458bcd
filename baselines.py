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

# Each method's published recipe (the README says where each value comes from); --recipe arat trains any method with
# AR-AT's (Sec. 4). lr_drops: epochs after which the lr is divided by 10. 0.031 and 0.007 are TRADES's own eps and step.
# fmt: off
RECIPES = {
    "arat":   dict(epochs=100, lr=0.1, lr_drops="75,90", weight_decay=5e-4, eps=8 / 255, step_size=2 / 255,
                   attack_steps=10),
    "at":     dict(epochs=150, lr=0.1, lr_drops="50,100", weight_decay=5e-4, eps=8 / 255, step_size=2 / 255,
                   attack_steps=7),  # MadryLab robustness's CIFAR defaults, PGD-7
    "trades": dict(epochs=76, lr=0.1, lr_drops="74,89,99", weight_decay=2e-4, eps=0.031, step_size=0.007,
                   attack_steps=10, trades_beta=6.0),  # lr / 10 from epoch 75, / 100 from 90 (1-based)
    "mart":   dict(epochs=90, lr=0.01, lr_drops="74,89", weight_decay=3.5e-3, eps=0.031, step_size=0.007,
                   attack_steps=10, trades_beta=6.0),  # beta 5 for ResNet-18
    "lbgat":  dict(epochs=100, lr=0.1, lr_drops="74,89,99", weight_decay=2e-4, eps=0.031, step_size=0.007,
                   attack_steps=10, trades_beta=0.0),  # the reproduced LBGAT+TRADES(beta = 0) setting
}
# fmt: on


@dataclasses.dataclass
class BaselineConfig(arat.Config):
    """arat.py's flags, with the recipe's ones defaulting to the method's published recipe, and these."""

    epochs: int | None = arg(None, "training epochs; default the recipe's", "optimisation (Sec. 4)")
    lr: float | None = arg(None, "SGD learning rate; default the recipe's")
    weight_decay: float | None = arg(None, "on every parameter; default the recipe's")
    attack_steps: int | None = arg(None, "attack steps in training; default the recipe's")
    method: str = arg("trades", "at | trades | mart | lbgat | asym-trades", "baselines (Tables 3, 4, 16)")
    recipe: str = arg("official", "official: the method's published recipe (README) | arat: AR-AT's (Sec. 4)")
    trades_beta: float | None = arg(None, "weight of the KL term of TRADES, MART, LBGAT; default the recipe's")
    asym_lambda: float = arg(6.0, "weight of Asym-TRADES's KL term (Appendix F)")


# -------------------------------------------------------------------------------------------------------------- Attacks


def trades_attack(model, extra, x, y, cfg, shard=(0, 1), loss="kl"):
    """The attack of TRADES's, MART's and LBGAT's official code: from x + 0.001 N(0, 1), --attack-steps sign steps of
    --step-size within the --eps box, model in eval mode. TRADES maximises KL(p(x) || p(x')), MART CE(f(x'), y).
    p(x) is computed once per batch, not at every step as the official code does: the model does not change during
    the attack, so the examples are the same, at 27 forward-pass equivalents per TRADES step instead of 39. Under
    torchrun the start of the whole global batch is drawn and this process's rows kept, as in arat.pgd."""
    rank, world = shard
    start = torch.empty((len(x) * world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    with arat.train_mode(model, False), arat.frozen_weights(model):
        with torch.no_grad():
            p = F.softmax(model(x), dim=1) if loss == "kl" else None
        x_adv = x + 0.001 * start.normal_()[rank::world]
        for _ in range(cfg.attack_steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            if loss == "kl":
                objective = F.kl_div(logits.log_softmax(1), p, reduction="sum")
            else:
                objective = F.cross_entropy(logits, y)
            (grad,) = torch.autograd.grad(objective, x_adv)
            x_adv = x_adv.detach() + cfg.step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - cfg.eps), x + cfg.eps).clamp(0, 1)
    return x, x_adv


def mart_attack(model, extra, x, y, cfg, shard=(0, 1)):
    return trades_attack(model, extra, x, y, cfg, shard, loss="ce")


# --------------------------------------------------------------------------------------------------------------- Losses
# The order of the train-mode forward passes decides the BN running statistics: each loss keeps its official order.


def kl(p_logits, q_logits):
    """KL(p || q), summed over classes and averaged over the batch, with gradient to both sides (as in TRADES)."""
    return F.kl_div(q_logits.log_softmax(1), p_logits.softmax(1), reduction="batchmean")


def at_loss(model, extra, x, x_adv, y, cfg, alpha, beta):
    """AT (Madry et al., 2018): CE(f(x'), y), on the PGD examples only."""
    logits_adv = model(x_adv)
    ce_adv = F.cross_entropy(logits_adv, y)
    return ce_adv, {"ce_adv": ce_adv, "acc_adv": (logits_adv.argmax(1) == y).float().mean()}


def trades_loss(model, extra, x, x_adv, y, cfg, alpha, beta):
    """TRADES (Zhang et al., 2019): CE(f(x), y) + beta KL(p(x) || p(x')). Clean, then adversarial forward, as
    officially; the official code's second clean forward, identical in value, is not repeated (it only moved the BN
    statistics once more)."""
    logits, logits_adv = model(x), model(x_adv)
    ce, reg = F.cross_entropy(logits, y), kl(logits, logits_adv)
    terms = {"ce_clean": ce, "acc_clean": (logits.argmax(1) == y).float().mean(), "cls": ce, "inv": reg}
    return ce + cfg.trades_beta * reg, terms | {"acc_adv": (logits_adv.argmax(1) == y).float().mean()}


def mart_loss(model, extra, x, x_adv, y, cfg, alpha, beta):
    """MART (Wang et al., 2020): BCE(f(x'), y) + beta / B sum_i KL_i(p(x) || p(x')) (1 - p_y(x_i)), where
    BCE(f(x'), y) = CE(f(x'), y) - log(1 - max_{k != y} p_k(x')). Clean, then adversarial forward, as officially."""
    logits, logits_adv = model(x), model(x_adv)
    p, p_adv = logits.softmax(1), logits_adv.softmax(1)
    top2 = p_adv.argsort(1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])  # the most likely wrong class
    ce_adv = F.cross_entropy(logits_adv, y)
    bce = ce_adv + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
    kl_i = F.kl_div(torch.log(p_adv + 1e-12), p, reduction="none").sum(1)
    reg = (kl_i * (1.0000001 - p.gather(1, y[:, None]).squeeze(1))).mean()
    terms = {"ce_adv": ce_adv, "acc_adv": (logits_adv.argmax(1) == y).float().mean(), "cls": bce, "inv": reg}
    return bce + cfg.trades_beta * reg, terms


def lbgat_loss(model, teacher, x, x_adv, y, cfg, alpha, beta):
    """LBGAT (Cui et al., 2021): CE(g(x), y) + MSE(f(x'), g(x)) (+ beta KL(p(x) || p(x')), 0 in the paper's runs),
    with g a ResNet-18 teacher on clean images, trained jointly: both terms reach it. Its BNs are its own."""
    logits_adv, logits_teacher = model(x_adv), teacher(x)
    ce_teacher, mse = F.cross_entropy(logits_teacher, y), F.mse_loss(logits_adv, logits_teacher)
    loss = ce_teacher + mse + (cfg.trades_beta * kl(model(x), logits_adv) if cfg.trades_beta else 0)
    terms = {"ce_adv": F.cross_entropy(logits_adv, y), "acc_adv": (logits_adv.argmax(1) == y).float().mean()}
    return loss, terms | {"ce_teacher": ce_teacher, "mse": mse}


def lbgat_teacher(model, cfg):
    """LBGAT's teacher: a single-BN ResNet-18 whatever the student (as in its paper), trained by the same optimiser."""
    return arat.build_model("resnet18", model.fc.out_features, split_bn=False)


def asym_trades_loss(model, extra, x, x_adv, y, cfg, alpha, beta):
    """Asym-TRADES (Appendix F, Table 15): alpha CE(f(x'), y) + beta CE(f_aux(x), y) + lambda KL(sg(p_aux(x)) || p(x')),
    AR-AT with TRADES's logit-level term in place of the feature-level one: split BN, auto-balance, no predictor.
    Table 15 writes the KL's arguments as (f(x'), sg(f_aux(x))); as in TRADES, the clean distribution is the target
    it pulls p(x') towards, and the stop-gradient keeps the auxiliary branch out of the KL's gradient."""
    logits_adv = model(x_adv)
    with arat.bn_branch(model, "aux"):
        logits = model(x)
    ce_adv, ce = F.cross_entropy(logits_adv, y), F.cross_entropy(logits, y)
    reg, cls = kl(logits.detach(), logits_adv), alpha * ce_adv + beta * ce
    terms = {"ce_adv": ce_adv, "ce_clean": ce, "cls": cls, "inv": reg}
    terms |= {
        "acc_adv": (logits_adv.argmax(1) == y).float().mean(),
        "acc_clean": (logits.argmax(1) == y).float().mean(),
    }
    return cls + cfg.asym_lambda * reg, terms


def nothing(model, cfg):
    return nn.Module()


METHODS = {
    "at": arat.Method("at", arat.arat_attack, at_loss, nothing),
    "trades": arat.Method("trades", trades_attack, trades_loss, nothing),
    "mart": arat.Method("mart", mart_attack, mart_loss, nothing),
    "lbgat": arat.Method("lbgat", trades_attack, lbgat_loss, lbgat_teacher),
    "asym-trades": arat.Method("asym-trades", arat.arat_attack, asym_trades_loss, nothing),
}


# ----------------------------------------------------------------------------------------------------------------- Main


def setup(cfg: BaselineConfig):
    """The recipe's values for every recipe flag not given, then arat.py's checks: (cfg, method, run name)."""
    arat._one_of("--method", cfg.method, list(METHODS))
    arat._one_of("--recipe", cfg.recipe, ["official", "arat"])
    asym = cfg.method == "asym-trades"
    recipe = dict(RECIPES["arat" if cfg.recipe == "arat" or asym else cfg.method])
    recipe |= {"trades_beta": 5.0} if cfg.method == "mart" and cfg.arch in (None, "resnet18") else {}  # MART, ResNet-18
    recipe |= {"lr": 0.01} if cfg.method == "lbgat" and cfg.dataset == "imagenette" else {}  # Table 4: 0.1 diverged
    if cfg.norm == "l2":  # the recipes' budgets are L-inf ones; L2 keeps arat.py's (0.5, step 0.125)
        recipe = {k: v for k, v in recipe.items() if k not in ("eps", "step_size")}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in recipe.items() if getattr(cfg, k) is None})
    cfg = dataclasses.replace(cfg, trades_beta=6.0 if cfg.trades_beta is None else cfg.trades_beta)
    # AR-AT's own switches: only Asym-TRADES has split BN and auto-balance; no method has the feature-level term
    cfg = dataclasses.replace(
        cfg, gamma=0.0, layers="", predictor=False, split_bn=asym, auto_balance=asym and cfg.auto_balance
    )
    cfg = arat.resolve(cfg, label=lambda c: c.method + ("-arat-recipe" if c.recipe == "arat" and not asym else ""))
    return cfg, METHODS[cfg.method], cfg.method


if __name__ == "__main__":
    arat.main(arat.parse_args(config=BaselineConfig, prog="baselines.py"), setup, "baselines.py")
