"""Train a CIFAR-10 classifier (airbench recipe by default) and write a model folder.

    atop train classifier --out runs/clf                       # airnet, 16 epochs (the shipped one: 20, 90.4 %)
    atop train classifier --out runs/clf-at --adversarial n-fgsm --tta none   # the adversarially trained baseline
    torchrun --nproc_per_node 2 -m atop_cli train classifier --out runs/clf   # DDP (gloo on CPU)
    atop train classifier --out runs/kd --teacher runs/a --teacher runs/b      # distilled from an ensemble

Recipe (after airbench94): whole-batch tensor augmentation (flip, +-2 px reflect-translate), SGD Nesterov on
a summed loss with a warm-up/linear-decay schedule, label smoothing 0.2, BatchNorm biases at 64x learning
rate, data-initialised whitening conv whose bias trains only for the first 3 epochs, and lookahead (EMA)
weights. bf16 autocast where it is faster (CUDA, a CPU with AMX, or an AMD CPU with AVX-512 BF16; ``--bf16/--no-bf16`` to choose) and
channels_last. A checkpoint is written every epoch; ``--resume`` continues bit-identically because every epoch
draws its randomness from (seed, epoch).

Knowledge distillation (``--teacher``, repeatable): the target is ``--distill`` x the softmax of the teachers'
mean logits (no TTA, on the same augmented batch) + the rest x the label-smoothed labels; the student keeps the
architecture (and so the serving cost) of its own ``--arch``. The card lists the teachers.

Training on purified images (``--purifier FOLDER``): a ``--purified-fraction`` of every batch is replaced by
g(RT(x)), the folder's frozen purifier applied to a fresh draw of its card's random transform, so the classifier
learns the images the purified pipeline feeds it as well as clean ones (``Purify``). The card records the purifier
(folder, architecture, sha256, RT).

Adversarial training (``--adversarial``, the AT baseline of the evaluation's Table 1) trains on examples made
per batch against the current model (``adversarial_batch``), learns the first conv instead of freezing a
whitening one, and records its own PGD-10 accuracy in the card.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from atop_serve import modelio
from atop_serve.errors import AtopError
from atop_serve.pipeline import TTA_MODES, TTAClassifier
from atop_serve.registry import create_classifier

from . import common
from .data import Dataset, augment, load_cifar10


@dataclass
class ClassifierConfig:
    arch: str = "airnet"
    epochs: int = 16
    batch_size: int = 1024  # global batch (split across ranks)
    lr: float = 11.5  # per 1024 examples of summed loss (airbench scaling)
    momentum: float = 0.85
    weight_decay: float = 0.0153
    bias_scaler: float = 64.0  # BatchNorm biases learn this much faster
    label_smoothing: float = 0.2
    whiten_bias_epochs: int = 3
    translate: int = 2  # pixels of random translation
    warmup: float = 0.23  # fraction of steps to the learning-rate peak
    lookahead: bool = True
    tta: str = "flip-translate"  # test-time augmentation written into the card
    adversarial: str = "none"  # none | fgsm-rs | n-fgsm | pgd (ADVERSARIAL)
    eps: float = 8 / 255
    seed: int = 0
    bf16: bool | None = None  # None: where it is faster (common.fast_bf16)
    limit: int = 0  # use a class-balanced subset of N training images (tests, smoke runs); 0 = all
    eval_n: int = 0  # test images for the final accuracy (class-balanced); 0 = all
    stop_after: int = 0  # end this run after N epochs (a time-boxed run; continue with --resume); 0 = no
    teachers: tuple[str, ...] = ()  # model folders whose classifiers (mean logits, no TTA) teach (distillation)
    distill: float = 0.5  # with teachers: weight of the teachers' probabilities in the target (rest: smoothed labels)
    purifier: str = ""  # model folder whose frozen purifier (and RT) purifies part of every batch; "" = none
    purified_fraction: float = 0.5  # with purifier: share of each batch replaced by g(RT(x))
    data: str = ""
    device: str = "auto"
    extra: dict = field(default_factory=dict)


def param_groups(model, cfg: ClassifierConfig):
    """airbench's groups: BatchNorm biases at ``bias_scaler`` x the learning rate (same absolute weight
    decay), everything else at the base rate. Weight decay is decoupled from the learning rate."""
    kilostep = 1024 * (1 + 1 / (1 - cfg.momentum))
    lr = cfg.lr / kilostep
    wd = cfg.weight_decay * cfg.batch_size / kilostep
    biases = [p for n, p in model.named_parameters() if p.requires_grad and "norm" in n and p.ndim == 1]
    whiten = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("whiten.")
              and cfg.adversarial == "none"]  # AT learns the first conv like the rest (see train)
    ids = {id(p) for p in biases + whiten}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    lr_b = lr * cfg.bias_scaler
    groups = [dict(params=other, lr=lr, weight_decay=wd / lr, name="other"),
              dict(params=biases, lr=lr_b, weight_decay=wd / lr_b, name="bias")]
    if whiten:  # the whitening bias: base rate, stopped after whiten_bias_epochs (lr 0 keeps DDP's buckets intact)
        groups.append(dict(params=whiten, lr=lr, weight_decay=wd / lr, name="whiten"))
    for g in groups:
        g["base_lr"] = g["lr"]
    return groups


def whitening_sample(train_set: Dataset, n: int = 5000, seed: int = 0) -> Dataset:
    """The images the whitening conv is initialised from: a seeded class-balanced subset. (Not the first
    ``n``: an image-folder source is read class by class, and the first 5,000 were all airplanes.)"""
    return train_set.balanced_subset(min(n, len(train_set)), seed=seed)


class Teacher(torch.nn.Module):
    """The mean logits of frozen classifiers (no TTA), for knowledge distillation."""

    def __init__(self, folders):
        super().__init__()
        self.members = torch.nn.ModuleList(modelio.load_classifier(f, tta="none").classifier for f in folders)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, x):
        return sum(m(x).float() for m in self.members) / len(self.members)


class Purify(torch.nn.Module):
    """A frozen purifier with its RT: ``purify_rows(x, n, gen)`` replaces the first ``n`` rows of a batch by
    g(RT(x)) on draws from ``gen`` (rows are already in random order, so the purified ones are a random subset)."""

    def __init__(self, folder: str):
        super().__init__()
        from atop_serve.transforms import draw_rt_inputs, random_transform

        self.purifier, self.rt = modelio.load_purifier(folder)
        self.requires_grad_(False).eval()
        self._draw, self._transform = draw_rt_inputs, random_transform

    @torch.no_grad()
    def purify_rows(self, x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        if n <= 0:
            return x
        draws = self._draw(self.rt, n, 1, gen).flat()
        draws = type(draws)(*(t.to(x.device) for t in draws))
        x_t, mask = self._transform(x[:n].float(), self.rt, draws)
        purified = self.purifier(x_t.contiguous(memory_format=torch.channels_last), mask).float()
        return torch.cat([purified, x[n:]]).contiguous(memory_format=torch.channels_last)


def soft_targets(teacher_logits: torch.Tensor, y: torch.Tensor, smoothing: float, weight: float) -> torch.Tensor:
    """Class-probability targets: ``weight`` x the teachers' softmax + (1 - ``weight``) x the label-smoothed
    one-hot labels (what the recipe trains on without teachers)."""
    c = teacher_logits.size(1)
    labels = F.one_hot(y, c).float() * (1 - smoothing) + smoothing / c
    return weight * teacher_logits.softmax(1) + (1 - weight) * labels


def lr_factor(step: int, total: int, warmup: float) -> float:
    """airbench's triangle: 0.2 -> 1 at ``warmup`` of the steps -> 0.07 at the end."""
    w = max(1, int(warmup * total))
    if step < w:
        return 0.2 + 0.8 * step / w
    return 1.0 - 0.93 * (step - w) / max(1, total - w)


class Lookahead:
    """Slow weights pulled toward the fast ones every 5 steps; the fast weights are reset to them."""

    def __init__(self, model):
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model, decay: float):
        for k, v in model.state_dict().items():
            if k in self.state:
                self.state[k].lerp_(v, 1 - decay)
                v.copy_(self.state[k])


ADVERSARIAL = ("none", "fgsm-rs", "n-fgsm", "pgd")


def adversarial_batch(model, x, y, cfg: ClassifierConfig, gen: torch.Generator, rt: common.Runtime):
    """Training examples at l_inf ``cfg.eps`` against the current model (in eval mode while crafting):

    - ``fgsm-rs`` (Wong et al. 2020): uniform start in the eps-ball, one signed step of 1.25 eps, projected;
    - ``n-fgsm`` (de Jorge et al. 2022): uniform noise of 2 eps, one signed step of eps, *not* projected
      back to the eps-ball; the same cost as FGSM-RS and it avoids catastrophic overfitting, which FGSM-RS
      suffers at eps 8/255 with this recipe's long high learning-rate phase;
    - ``pgd``: PGD-7, step 2/255, random start (7x the cost of the single-step attacks).
    """
    from .attacks import PGD

    was_training = model.training
    model.eval()
    with rt.autocast(cfg.bf16):
        if cfg.adversarial == "n-fgsm":
            noise = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * (2 * cfg.eps)
            x0 = (x + noise).clamp(0, 1).requires_grad_(True)
            loss = F.cross_entropy(model(x0).float(), y)
            (grad,) = torch.autograd.grad(loss, x0)
            x_adv = (x0 + cfg.eps * grad.sign()).clamp(0, 1).detach()
        else:
            steps, alpha = (1, 1.25 * cfg.eps) if cfg.adversarial == "fgsm-rs" else (7, 2 / 255)
            x_adv = PGD(model, eps=cfg.eps, alpha=alpha, steps=steps, random_start=True, generator=gen)(x, y)
    model.train(was_training)
    return x_adv.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate(model, data: Dataset, batch_size: int = 1000, bf16: bool = False, device="cpu") -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        x = data.images[i : i + batch_size].to(device).float().div_(255).contiguous(memory_format=torch.channels_last)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            correct += (model(x).argmax(1).cpu() == data.labels[i : i + batch_size]).sum().item()
    return correct / len(data)


def pgd_accuracy(model, data: Dataset, eps: float, steps: int = 10, batch_size: int = 250, device="cpu",
                 seed: int = 0) -> float:
    """Accuracy under PGD-``steps`` (l_inf ``eps``, step eps/4, random start) against ``model`` itself, fp32."""
    from .attacks import PGD

    model.eval()
    x, y = data.images.to(device).float().div_(255), data.labels.to(device)
    gen = torch.Generator().manual_seed(seed)
    x_adv = PGD(model, eps=eps, alpha=eps / 4, steps=steps, random_start=True, generator=gen).batched(x, y, batch_size)
    with torch.no_grad():
        correct = sum((model(x_adv[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
                      for i in range(0, len(data), batch_size))
    return correct / len(data)


def _frozen_helper(cfg: ClassifierConfig, rt: common.Runtime, option: str, share_option: str, share: float, build):
    """A frozen network that shapes standard training (``--teacher``, ``--purifier``), built and placed on the device
    once its settings are checked: not with adversarial training, and its share of the batch or target in (0, 1]."""
    if cfg.adversarial != "none":
        raise AtopError(f"{option} is for standard training; it cannot be combined with --adversarial")
    if not 0 < share <= 1:
        raise AtopError(f"{share_option} must be in (0, 1], got {share}")
    return build().to(rt.device, memory_format=torch.channels_last)


def train(cfg: ClassifierConfig, out: Path, resume: bool = False, show_progress: bool = True) -> dict:
    out = Path(out)
    common.check_run(out, resume, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, limit=cfg.limit,
                     eval_n=cfg.eval_n, stop_after=cfg.stop_after)
    if cfg.tta not in TTA_MODES:
        raise AtopError(f"unknown --tta {cfg.tta!r}; valid: {', '.join(TTA_MODES)}")
    rt = common.setup_runtime(cfg.device)
    if cfg.bf16 is None:
        cfg.bf16 = common.fast_bf16(rt.device)
    torch.manual_seed(cfg.seed)
    train_set, test_set = load_cifar10(cfg.data or None)
    if cfg.limit:
        train_set = train_set.balanced_subset(min(cfg.limit, len(train_set)), seed=cfg.seed)
    if cfg.eval_n:  # chosen now: a bad --eval-n fails before the training, not after it
        test_set = test_set.balanced_subset(min(cfg.eval_n, len(test_set)))
    model = create_classifier(cfg.arch, num_classes=len(train_set.classes))
    if hasattr(model, "init_whiten") and cfg.adversarial == "none":
        # data-initialised, then frozen (its bias trains for whiten_bias_epochs). Not for adversarial training:
        # whitening divides by the square roots of the patch covariance's eigenvalues, amplifying the
        # low-variance (high-frequency) directions an l_inf perturbation fills up to ~45x, and AT from it
        # stays at chance (measured: loss ln 10 after 2 epochs); there the first conv is learned like the rest.
        model.init_whiten(whitening_sample(train_set, seed=cfg.seed).images.float() / 255)
        model.whiten.weight.requires_grad_(False)
    model = model.to(rt.device, memory_format=torch.channels_last)
    teacher = _frozen_helper(cfg, rt, "--teacher", "--distill", cfg.distill, lambda: Teacher(cfg.teachers)) \
        if cfg.teachers else None
    purify = _frozen_helper(cfg, rt, "--purifier", "--purified-fraction", cfg.purified_fraction,
                            lambda: Purify(cfg.purifier)) if cfg.purifier else None
    groups = param_groups(model, cfg)
    opt = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=cfg.momentum, nesterov=True)
    local_bs = cfg.batch_size // rt.world
    steps_per_epoch = len(train_set) // cfg.batch_size or 1
    total = steps_per_epoch * cfg.epochs
    lookahead = Lookahead(model) if cfg.lookahead else None
    ddp = torch.nn.parallel.DistributedDataParallel(model) if rt.world > 1 else model
    ckpt_dir = out / "checkpoint"
    start_epoch, elapsed, history = 0, 0.0, []
    if resume:
        tensors, meta = common.load_checkpoint(ckpt_dir)
        common.load_state(model, common.unprefixed("model", tensors), ckpt_dir)
        common.load_optimizer_tensors(opt, tensors)
        if lookahead:
            lookahead.state = common.unprefixed("lookahead", tensors)
        start_epoch, elapsed, history = meta["epoch"] + 1, meta["elapsed"], meta.get("history", [])
        if rt.is_main:
            print(f"resumed from {ckpt_dir} at epoch {start_epoch}")
    last_epoch = cfg.epochs if not cfg.stop_after else min(cfg.epochs, start_epoch + cfg.stop_after)
    for epoch in range(start_epoch, last_epoch):
        t0 = time.perf_counter()
        gen = common.epoch_generator(cfg.seed, epoch)
        perm = torch.randperm(len(train_set), generator=gen)[: steps_per_epoch * cfg.batch_size]
        if epoch >= cfg.whiten_bias_epochs:
            for g in opt.param_groups:
                if g["name"] == "whiten":
                    g["base_lr"] = 0.0
        ddp.train()
        bar = common.progress(len(perm), f"epoch {epoch + 1}/{cfg.epochs}", show_progress and rt.is_main)
        loss_sum = torch.zeros(())
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, total, cfg.warmup)
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size][rt.rank * local_bs : (rt.rank + 1) * local_bs]
            x = augment(train_set.images[idx].float().div_(255), gen, cfg.translate)
            x = x.to(rt.device).contiguous(memory_format=torch.channels_last)
            y = train_set.labels[idx].to(rt.device)
            if purify is not None:
                with rt.autocast(cfg.bf16):
                    x = purify.purify_rows(x, round(cfg.purified_fraction * len(idx)), gen)
            if cfg.adversarial != "none":
                x = adversarial_batch(model, x, y, cfg, gen, rt)
            with rt.autocast(cfg.bf16):
                if teacher is not None:
                    target = soft_targets(teacher(x), y, cfg.label_smoothing, cfg.distill)
                    loss = F.cross_entropy(ddp(x).float(), target, reduction="sum")
                else:
                    loss = F.cross_entropy(ddp(x), y, label_smoothing=cfg.label_smoothing, reduction="sum")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if lookahead and step % 5 == 0:
                lookahead.update(model, decay=0.95**5 * (step / total) ** 3)
            loss_sum += loss.detach().float().cpu() / len(idx)
            bar.update(len(idx) * rt.world)
            bar.set_postfix(loss=f"{loss.item() / len(idx):.3f}")
        bar.close()
        if not math.isfinite(loss_sum.item()):
            raise AtopError(f"training diverged at epoch {epoch + 1} (loss {loss_sum.item()}); lower --lr")
        elapsed += time.perf_counter() - t0
        rec = {"epoch": epoch + 1, "loss": loss_sum.item() / steps_per_epoch, "seconds": round(elapsed, 1)}
        history.append(rec)
        if rt.is_main:
            tensors = {**common.prefixed("model", model.state_dict()), **common.optimizer_tensors(opt)}
            if lookahead:
                tensors.update(common.prefixed("lookahead", lookahead.state))
            common.save_checkpoint(ckpt_dir, tensors, {"epoch": epoch, "elapsed": elapsed, "history": history,
                                                       "config": common.config_dict(cfg)})
            print(f"epoch {epoch + 1}: loss {rec['loss']:.4f}, {elapsed:.0f}s")
    if last_epoch < cfg.epochs:
        common.teardown(rt)
        return {"metrics": {}, "history": history, "model": model, "stopped_at": last_epoch}
    if lookahead:
        lookahead.update(model, decay=1.0)
    common.sync_buffers(model, rt)
    rank_hashes = common.rank_hashes(model, rt)
    metrics = {}
    if rt.is_main:
        for mode in ("none", "flip", "flip-translate"):
            metrics[f"test_acc_tta_{mode}"] = evaluate(TTAClassifier(model, mode), test_set, device=rt.device)
        if cfg.adversarial != "none":  # an AT classifier's point: its own robustness (no TTA), on <= 1,000 images
            sub = test_set.balanced_subset(min(1000, len(test_set)))
            metrics["test_acc_pgd10_tta_none"] = pgd_accuracy(model, sub, cfg.eps, 10, device=rt.device)
            metrics["pgd10_images"] = len(sub)
        card = {
            "format": "atop-serve/1",
            "classes": train_set.classes,
            "input": {"size": 32, "range": "RGB float in [0, 1], NCHW"},
            "classifier": {
                "arch": cfg.arch, "file": modelio.CLASSIFIER_FILE, "tta": cfg.tta,
                "dataset": {"source": train_set.source, "train_images": len(train_set), "test_images": len(test_set)},
                "training": {"config": common.config_dict(cfg), "epochs": cfg.epochs, "wall_seconds": round(elapsed, 1),
                             "hardware": common.hardware(), "world_size": rt.world, "rank_weight_sha256": rank_hashes, "command": common.command_line(),
                             "git_commit": common.git_commit(), "torch": torch.__version__, "history": history},
                "metrics": {**metrics, "measured_on": f"all {len(test_set)} test images", "tta_used_by_pipeline": cfg.tta},
            },
        }
        if cfg.teachers:  # what taught it: enough to trace each teacher's own training
            entries = [(f, modelio.read_card(f)["classifier"]) for f in cfg.teachers]
            card["classifier"]["training"]["teachers"] = [
                {"folder": str(f), **{k: c.get(k) for k in ("arch", "sha256", "metrics")},
                 "command": c.get("training", {}).get("command")} for f, c in entries]
        if cfg.purifier:  # what the purified share of each batch came from
            pc = modelio.read_card(cfg.purifier)["purifier"]
            card["classifier"]["training"]["purifier"] = {
                "folder": str(cfg.purifier), "fraction": cfg.purified_fraction,
                **{k: pc.get(k) for k in ("arch", "sha256", "rt")}}
        out.mkdir(parents=True, exist_ok=True)
        card["classifier"]["sha256"] = modelio.save_weights(model, out / modelio.CLASSIFIER_FILE)
        modelio.write_card(out, card)
        print({k: round(v, 4) for k, v in metrics.items()})
    common.teardown(rt)
    return {"metrics": metrics, "history": history, "model": model}
