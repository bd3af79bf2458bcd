"""Tests for arat.py: one property per test, CPU only, offline, on data the tests make themselves."""

import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import arat

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# -------------------------------------------------------------------------------------------------------------- helpers

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]  # one class per tint: easy and robust


def write_folder(root, n_train, n_val, size=20, classes=3, seed=0):
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


FAST = "--batch-size 8 --workers 0 --eval-n 8 --balance-n 8 --attack-steps 2 --eval-steps 3 --log-every 1".split()


def cli(data, out, *flags):
    """Config for a fast in-process run: batch 8, single-process loading, 16 px images for folder datasets."""
    size = [] if data in arat.DATASETS else ["--image-size", "16"]
    return arat.parse_args(["--dataset", str(data), "--out", str(out), *size, *FAST, *flags])


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


class TinyNet(nn.Module):
    """A small split-BN CNN for attack tests: two conv-BN-ReLU stages, pooling, a linear head."""

    def __init__(self, classes=3, width=8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def linear_model(seed=0):
    """A linear classifier on 3x12x12 images: its loss reacts strongly to small input changes."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 3))
    nn.init.normal_(model[1].weight, std=0.1)
    return model


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return arat.convert_split_bn(TinyNet()).eval()


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


def test_pgd_computes_no_weight_gradients():
    model = tiny_model()
    arat.pgd(model, torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), 8 / 255, 2 / 255, 2)
    assert all(p.grad is None for p in model.parameters())


def test_fp16_attack_gradients_do_not_vanish():
    # A confident classifier: p(wrong) ~ e^-14, so dCE/dlogit ~ 1e-6 and the gradient reaching the conv layer,
    # ~5e-9, is below half of fp16's smallest subnormal (6e-8): an unscaled fp16 backward returns exact zeros.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[0.005], [-0.005]]).expand(2, 4 * 8 * 8))
        model[2].bias.copy_(torch.tensor([14.0, 0.0]))
    x, y = torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)

    def input_grad():
        x_ = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_), y, reduction="sum"), x_)
        return g

    assert input_grad().abs().sum() > 0  # fp32: the gradient exists
    with torch.autocast("cpu", dtype=torch.float16):
        assert model(x).dtype == torch.float16
        assert input_grad().abs().sum() == 0  # naive fp16 backward underflows to exact zeros
        x_adv = arat.pgd(model, x, y, 8 / 255, 2 / 255, 1, random_start=False)
    assert (x_adv - x).abs().amax() > 1 / 255  # pgd still takes a full step


# ------------------------------------------------------------------------------------------------------------- Split BN


def test_split_bn_clean_forward_updates_only_aux_statistics_and_adversarial_only_main():
    model = tiny_model().train()
    bn = model.body[1]
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
    assert tap.dims(model, 64, "cpu") == [512, 256]
    cfg = arat.resolve(arat.Config(dataset="cifar10", layers="layer4.1.bn2,layer3.0.bn1", attack_steps=1))
    predictors = nn.ModuleList(arat.make_predictor(d) for d in (512, 256))
    x, y = torch.rand(4, 3, 64, 64), torch.randint(0, 5, (4,))
    aux0 = model.layer1[0].bn1.aux.running_mean.clone()
    loss, terms = arat.train_step(model.train(), predictors, tap, x, y, cfg, 0.5, 0.5)
    loss.backward()
    assert math.isfinite(loss.item()) and terms["inv"] > 0
    assert not torch.equal(model.layer1[0].bn1.aux.running_mean, aux0)  # the clean pass used the aux BNs
    assert model.fc.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------- Eqs. 3-7


def _invariance_grads(stop_grad):
    """Gradients of the invariance term alone, with z (clean, aux BN) and z' (adversarial, main BN) captured."""
    model = tiny_model().train()
    tap = arat.FeatureTap(model, ["body.4"])
    predictor = arat.make_predictor(8).train()
    x = torch.rand(8, 3, 8, 8)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    with tap.capture() as z_adv:
        model(x_adv)
    with arat.bn_branch(model, "aux"), tap.capture() as z:
        model(x)
    z["body.4"].retain_grad()
    arat.invariance_loss(z_adv["body.4"], z["body.4"], predictor, stop_grad).backward()
    split = model.body[4]
    return split, predictor, z["body.4"]


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


def test_features_are_captured_only_in_the_loss_passes_not_in_attack_steps():
    model = tiny_model().train()
    tap = arat.FeatureTap(model, ["body.2"])
    seen = []
    model.register_forward_pre_hook(lambda m, i: seen.append(tap.feats is not None))
    cfg = arat.resolve(arat.Config(dataset="cifar10", layers="body.2", attack_steps=4))
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 3, (4,))
    arat.train_step(model, nn.ModuleList([arat.make_predictor(8)]), tap, x, y, cfg, 0.5, 0.5)
    assert seen == [False] * 4 + [True, True]


def test_gradient_similarity_is_plus_one_for_aligned_and_minus_one_for_opposed_losses():
    model = TinyNet()
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    loss = model(torch.rand(4, 3, 8, 8)).square().mean()
    sim, conflict = arat.gradient_similarity(loss, 2 * loss, weights)
    assert sim == pytest.approx(1, abs=1e-5) and conflict == 0
    sim, conflict = arat.gradient_similarity(loss, -loss, weights)
    assert sim == pytest.approx(-1, abs=1e-5) and conflict > 0.9  # all weights with a non-zero gradient


def test_plain_at_runs_are_labelled_at():
    cfg = arat.resolve(arat.parse_args(["--gamma", "0", "--no-auto-balance", "--alpha", "1", "--beta", "0"]))
    assert cfg.out == "runs/cifar10-resnet18-at-s0" and cfg.layers == ""


def test_plain_at_skips_the_clean_pass():
    model = tiny_model().train()
    cfg = arat.resolve(arat.Config(dataset="cifar10", gamma=0, auto_balance=False, alpha=1, beta=0, attack_steps=1))
    tap = arat.FeatureTap(model, [])
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    loss, terms = arat.train_step(model, nn.ModuleList(), tap, torch.rand(4, 3, 8, 8), torch.zeros(4).long(), cfg, 1, 0)
    assert len(calls) == 2 and set(terms) == {"ce_adv", "acc_adv"} and torch.isclose(loss, terms["ce_adv"])


# ---------------------------------------------------------------------------------------------------------------- Eq. 8


def test_auto_balance_alpha_is_the_measured_aux_accuracy_and_alpha_plus_beta_is_one():
    model = tiny_model()
    x, y = torch.rand(40, 3, 8, 8), torch.randint(0, 3, (40,))
    with arat.bn_branch(model, "aux"), torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    acc = arat.clean_accuracy(model, loader, "cpu", "aux") / 100
    alpha, beta = arat.auto_balance(acc)
    assert alpha == pytest.approx(expected) and alpha + beta == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------------- models


def test_default_taps_give_the_reference_feature_dimensions():
    expected = {"resnet18": [512] * 4, "preact18": [256, 512, 512, 512, 512], "wrn34": [320] + [640] * 10}
    for arch, dims in expected.items():
        model = arat.build_model(arch, 10)
        assert arat.FeatureTap(model, arat.ARCHS[arch][1]).dims(model, 32, "cpu") == dims


def test_single_bn_inference_models_have_the_reference_parameter_counts():
    for arch, count in {"resnet18": 11_173_962, "wrn34": 46_160_474}.items():
        model = arat.merge_split_bn(arat.build_model(arch, 10))
        assert sum(p.numel() for p in model.parameters()) == count


def test_lr_schedule_drops_at_75_and_90_percent_and_quirks_shift_it():
    lrs = [arat.lr_factor(e, 100) for e in range(100)]
    assert lrs[74] == 1 and lrs[75] == pytest.approx(0.1) and lrs[89] == pytest.approx(0.1)
    assert lrs[90] == pytest.approx(0.01)
    quirky = [arat.lr_factor(e, 100, official_quirks=True) for e in range(100)]
    # released code: epoch 1 at 0.02, 0.1 until epoch 76, 0.01 until 91, then 0.001 (1-based epochs)
    assert quirky[0] == 0.2 and quirky[75] == 1 and quirky[76] == pytest.approx(0.1)
    assert quirky[90] == pytest.approx(0.1) and quirky[91] == pytest.approx(0.01)


# ----------------------------------------------------------------------------------------------------------------- main


@pytest.mark.parametrize("variant", ["v0", "v1", "v2", "v3"])
def test_main_smoke_run_of_each_variant_writes_all_outputs(tiny, tmp_path, variant):
    metrics = arat.main(
        cli(
            tiny, tmp_path / variant, "--variant", variant, "--epochs", "3", "--max-steps", "4", "--grad-sim-every", "1"
        )
    )
    out = tmp_path / variant
    assert {p.name for p in out.iterdir()} == {"log.jsonl", "last.pt", "metrics.json"}
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert {"clean_acc", "pgd3_acc", "n_eval"} <= set(metrics) and metrics["n_eval"] == 8
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2] and log[-1]["step"] == 4  # 3 steps per epoch
    for r in log:
        assert all(math.isfinite(r[k]) for k in ("loss", "ce_adv", "ce_clean", "inv"))
        assert -1 <= r["grad_sim"] <= 1 and 0 <= r["conflict_frac"] <= 1
        assert r["alpha"] + r["beta"] == pytest.approx(1) and r["alpha"] == pytest.approx(r["balance_acc"] / 100)
    assert (log[-1]["clean_acc_aux"] is None) == (variant != "v3")
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert {"model", "predictors", "optimizer", "scheduler", "scaler", "epoch", "rng", "config"} <= set(ckpt)
    assert ckpt["config"]["variant"] == variant and not any("_orig_mod" in k for k in ckpt["model"])


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

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    for key in ("model", "predictors"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [r["epoch"] for r in resumed] == [1, 2]  # epoch 1's line, lost with the run, restored from last.pt
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]


def test_short_run_learns_an_easy_task_well_above_chance(tmp_path):
    data = write_folder(tmp_path / "colours", n_train=32, n_val=16, classes=4, seed=1)
    metrics = arat.main(cli(data, tmp_path / "run", "--batch-size", "16", "--epochs", "4", "--eval-n", "64"))
    assert metrics["clean_acc"] >= 75  # chance is 25%


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


def test_cifar10_loader_reads_the_python_release_and_trains_on_it(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kw: True)  # md5s of real files
    write_cifar10(tmp_path / "data")
    cfg = arat.resolve(arat.Config(dataset="cifar10", data_dir=str(tmp_path / "data"), download=False))
    train, test, classes = arat.load_data(cfg)
    assert (len(train), len(test), classes) == (40, 16, 10)
    x = train[0][0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(test[3][0], test[3][0])  # no augmentation at test time
    flags = ["--data-dir", str(tmp_path / "data"), "--no-download", "--max-steps", "2"]
    metrics = arat.main(cli("cifar10", tmp_path / "run", *flags))
    assert metrics["n_eval"] == 8 and metrics["config"]["image_size"] == 32


def test_imagenette_loader_reads_the_160px_release_and_resizes_and_crops(tmp_path):
    wnids = ["n01440764", "n02102040"]  # tench, English springer
    for split in ("train", "val"):
        for wnid in wnids:
            folder = tmp_path / "imagenette2-160" / split / wnid
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((30, 45, 3), 60 * i, np.uint8)).save(folder / f"img{i}.JPEG")
    cfg = arat.resolve(arat.Config(dataset="imagenette", data_dir=str(tmp_path), download=False, image_size=24))
    train, test, classes = arat.load_data(cfg)
    assert (len(train), len(test), classes) == (8, 8, 2)
    assert train[0][0].shape == test[0][0].shape == (3, 24, 24)


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
    "cifar missing offline": (["--no-download", "--data-dir", "{tmp}"], "--dataset cifar10: not found in"),
    "resume without checkpoint": (["--resume", "--out", "{tmp}/none"], "--resume: there is no checkpoint at"),
    "autoattack on 3 classes": (
        ["--dataset", "{tiny}", "--image-size", "16", "--out", "{tmp}/run", "--aa-n", "8"],
        "--aa-n: standard AutoAttack needs at least 10 classes",
    ),
    "unknown layer": (
        ["--dataset", "{tiny}", "--image-size", "16", "--out", "{tmp}/run", "--layers", "layer4.0.bn9"],
        "--layers: the model has no module 'layer4.0.bn9'; did you mean layer4.0.bn2, layer4.0.bn1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_a_one_line_message(case, tiny, tmp_path, capsys):
    flags, message = BAD_INPUTS[case]
    flags = [f.format(tmp=tmp_path, tiny=tiny) for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        arat.main(arat.parse_args(flags))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("arat.py: error: ") and message in err, err


def test_autoattack_breaks_what_pgd_breaks_on_a_non_robust_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(16, 3, 8, 8)
    y = model(x).argmax(1)  # 100% clean accuracy by construction
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    pgd_acc = arat.robust_accuracy(model, loader, "cpu", 1 / 255, 0.25 / 255, 20, "linf")
    aa_acc = arat.autoattack_accuracy(model, loader, "cpu", 1 / 255, "linf", 16)
    assert 0 < aa_acc <= pgd_acc < 100  # a budget small enough that some points survive both


def test_autoattack_calls_the_original_package_with_its_own_api(monkeypatch):
    import sys
    import types

    calls = {}

    class OriginalAutoAttack:  # the signature of the original package's class and method
        def __init__(
            self,
            model,
            norm="Linf",
            eps=0.3,
            seed=None,
            verbose=True,
            attacks_to_run=(),
            version="standard",
            is_tf_model=False,
            device="cuda",
            log_path=None,
        ):
            calls["init"] = {"norm": norm, "eps": eps, "version": version, "device": device}
            self.model = model

        def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False):
            calls["run"] = {"n": len(x_orig), "bs": bs, "return_labels": return_labels}
            return x_orig, torch.where(torch.arange(len(y_orig)) % 2 == 0, y_orig, -1)  # every other one broken

    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=OriginalAutoAttack))
    x, y = torch.rand(10, 3, 4, 4), torch.arange(10) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    acc = arat.autoattack_accuracy(nn.Flatten(), loader, "cpu", 0.5, "l2", 8)
    assert acc == 50.0
    assert calls == {
        "init": {"norm": "L2", "eps": 0.5, "version": "standard", "device": "cpu"},
        "run": {"n": 8, "bs": 4, "return_labels": True},
    }
