"""Pre-train the purifier g and fine-tune it with AToP (adversarial training on purification).

    atop train purifier --classifier runs/clf --out runs/pur            # l_g = hinge GAN + L1, on RT(x)
    atop train atop --model runs/pur --out runs/atop                    # + lambda * CE(f(g(RT(x'))), y)
    torchrun --nproc_per_node 2 -m atop_cli train purifier ...          # DDP (gloo on CPU)

Pre-training: g learns to repair RT(x) into x (L1 reconstruction + a small SN-PatchGAN hinge term).
With ``--sigma-range`` the noise level is drawn per image from U(0, sigma), so one pre-trained purifier
serves a sweep over sigma at evaluation time.

AToP fine-tuning (Lin et al., ICLR 2024): the classifier f is frozen (no parameter of it is handed to any
optimiser, it stays in eval mode, and its weights are checked bit-identical at the end); only g learns:

    L = l_g(x') + lambda * CE(f(g(RT(x'))), y)

on a batch mixing clean images (variant a) and adversarial images x' (variant b) made per batch by FGSM
(with random start) or PGD-k, l_inf 8/255, against the classifier alone (``--attack-target classifier``, as
the paper's code does) or through the whole pipeline with fresh RT draws at every step
(``--attack-target pipeline``). lambda is 0 for the first ``--warmup-epochs`` epochs. ``--cls-target clean``
replaces the label y by f's own prediction on the clean image x, a soft target,
``-sum softmax(f(x)) * log_softmax(f(g(RT(x'))))``: g learns to keep what the bare classifier says on the clean image
rather than to fix its mistakes. ``--cls-target mixed`` uses that soft target on the clean rows of each batch and
the label on the adversarial ones.

Distillation into a new architecture (``--teacher FOLDER --arch NAME``): the L1 target becomes the teacher
purifier's output on the same transformed input (same x', same RT draws) instead of the clean image, so a
student of another shape (e.g. the cheaper ``gated-unet-s2d``) learns what an AToP-trained purifier does to
clean and adversarial images directly, without repeating pre-training and every fine-tuning stage. A student
whose shape differs from the source purifier's starts from a fresh initialisation. The GAN and lambda * CE
terms stay as in AToP.
"""
from __future__ import annotations

import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from atop_serve import modelio
from atop_serve.config import RTConfig
from atop_serve.errors import AtopError
from atop_serve.nets.purifiers import PatchDiscriminator
from atop_serve.pipeline import PurifiedClassifier
from atop_serve.registry import create_purifier
from atop_serve.transforms import RTInputs, draw_rt_inputs, random_transform

from . import common
from .attacks import PGD
from .data import Dataset, augment, load_cifar10


@dataclass
class PurifierConfig:
    mode: str = "pretrain"  # pretrain | atop
    arch: str = ""  # pretrain: "" = gated-unet; atop: "" = the source's, another = carry its weights into that one
    rt: str = "rt2"
    sigma: float = 0.1  # RT2/RT3 noise std (per 32x32 pixel, images in [0, 1])
    sigma_range: bool = False  # pretrain: per-image sigma ~ U(0, sigma)
    rate: float = 0.25
    block: int = 4
    views: int = 3  # rt3 only
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3  # Adam, cosine-decayed to 5 %
    d_lr: float = 4e-4
    betas: tuple = (0.5, 0.999)
    d_width: int = 32
    gan_weight: float = 0.01  # hinge GAN term relative to L1
    # AToP
    lam: float = 0.05  # lambda: weight of the classification loss
    warmup_epochs: int = 0
    attack: str = "fgsm"  # fgsm | pgd-<k> | none
    attack_target: str = "classifier"  # classifier | pipeline
    eps: float = 8 / 255
    clean_fraction: float = 0.5  # share of each batch kept clean (variant a); the rest is adversarial
    cls_target: str = "label"  # atop: the classification loss's target: label (CE to y), clean (f's soft
    #                            prediction on the clean image) or mixed (clean rows soft, adversarial rows label)
    teacher: str = ""  # atop: a model folder whose purifier's output on the same RT(x') is the L1 target (distillation)
    seed: int = 0
    bf16: bool | None = None  # None: where it is faster (common.fast_bf16)
    limit: int = 0
    data: str = ""
    device: str = "auto"
    eval_n: int = 1000
    extra: dict = field(default_factory=dict)

    def rt_config(self, sigma: float | None = None) -> RTConfig:
        return RTConfig.named(self.rt, sigma=self.sigma if sigma is None else sigma, views=self.views,
                              rate=self.rate, block=self.block)


def _lr_factor(step, total):
    warmup = max(1, min(100, total // 10))
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def rt_draws(cfg: PurifierConfig, rt: RTConfig, n: int, gen: torch.Generator, device) -> RTInputs:
    d = draw_rt_inputs(rt, n, 1, gen).flat()
    if cfg.sigma_range and cfg.mode == "pretrain":
        scale = torch.rand(n, generator=gen).view(n, 1, 1, 1, 1)
        d = d._replace(z=d.z * scale)
    return RTInputs(*(t.to(device) for t in d))


def save_grid(path: Path, clean, transformed, purified) -> None:
    """A PNG of 16 images: rows clean | transformed | purified, upscaled 4x so a person can see them."""
    from PIL import Image

    rows = [torch.cat(list(t[:16].float().clamp(0, 1)), dim=2) for t in (clean, transformed, purified)]
    grid = (torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.Resampling.NEAREST).save(path)


@torch.no_grad()
def clean_accuracy(pipeline: PurifiedClassifier, data: Dataset, seed: int = 0, batch_size: int = 500) -> float:
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, len(data), batch_size):
        x = data.images[i : i + batch_size].float() / 255
        correct += (pipeline(x, generator=g).argmax(1) == data.labels[i : i + batch_size]).sum().item()
    return correct / len(data)


def make_adversarial(cfg: PurifierConfig, f, pipeline, x, y, gen) -> torch.Tensor:
    if cfg.attack == "none":
        return x
    if cfg.attack == "fgsm":
        steps, alpha = 1, 1.25 * cfg.eps
    elif cfg.attack.startswith("pgd-"):
        steps, alpha = int(cfg.attack[4:]), 2.5 * cfg.eps / int(cfg.attack[4:])
    else:
        raise AtopError(f"unknown --attack {cfg.attack!r}; use fgsm, pgd-<k> or none")
    target = f if cfg.attack_target == "classifier" else pipeline
    return PGD(target, eps=cfg.eps, alpha=alpha, steps=steps, random_start=True, generator=gen)(x, y)


CLS_TARGETS = ("label", "clean", "mixed")


def cls_targets(kind: str, clean_logits: torch.Tensor | None, y: torch.Tensor, n_clean: int) -> torch.Tensor | None:
    """Class probabilities the classification term is trained towards, per row of a batch whose first ``n_clean``
    rows are clean and the rest adversarial: None for ``label`` (plain CE to ``y``); softmax of f's logits on the
    clean images for ``clean``; for ``mixed``, those soft targets on the clean rows and the one-hot label on the
    adversarial rows (keep what f says on clean images, still pull adversarial ones to the truth)."""
    if kind == "label":
        return None
    probs = F.softmax(clean_logits.float(), dim=1)
    if kind == "mixed":
        probs = torch.cat([probs[:n_clean], F.one_hot(y[n_clean:], probs.shape[1]).to(probs.dtype)])
    return probs


def classification_loss(logits: torch.Tensor, y: torch.Tensor, clean_probs: torch.Tensor | None = None) -> torch.Tensor:
    """The AToP classification term: CE to the labels ``y``, or (``clean_probs`` given) the soft cross-entropy
    to those class probabilities (f's prediction on the clean image)."""
    if clean_probs is None:
        return F.cross_entropy(logits, y)
    return -(clean_probs * F.log_softmax(logits, dim=1)).sum(1).mean()


def carry_weights(g: torch.nn.Module, arch: str) -> torch.nn.Module:
    """A purifier of architecture ``arch`` holding ``g``'s weights: for fine-tuning into a variant with the same
    parameters and a different computation (e.g. ``gated-unet`` -> ``gated-unet-lrelu``)."""
    new = create_purifier(arch)
    try:
        new.load_state_dict(g.state_dict())
    except RuntimeError as e:
        raise AtopError(f"--arch {arch}: the source purifier's weights do not fit it (only architectures with the "
                        f"same parameters can be fine-tuned into each other): {str(e).splitlines()[0]}") from None
    return new


def train(cfg: PurifierConfig, out: Path, source: Path | None, resume: bool = False, show_progress: bool = True,
          classifier_source: Path | None = None) -> dict:
    """``source``: a model folder giving the classifier (pretrain) or classifier + purifier (atop);
    ``classifier_source`` (atop): take the classifier from this folder instead."""
    if cfg.mode not in ("pretrain", "atop"):
        raise AtopError(f"unknown mode {cfg.mode!r}")
    out = Path(out)
    common.check_run(out, resume, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, limit=cfg.limit,
                     eval_n=cfg.eval_n)
    try:
        cfg.rt_config()
    except (TypeError, ValueError) as e:
        raise AtopError(f"bad random transform (--rt, --sigma, --rate): {e}") from None
    if not (cfg.attack in ("fgsm", "none") or re.fullmatch(r"pgd-[1-9]\d*", cfg.attack)):
        raise AtopError(f"unknown --attack {cfg.attack!r}; use fgsm, pgd-<k> (k >= 1) or none")
    for name, value in (("lambda", cfg.lam), ("gan-weight", cfg.gan_weight)):
        if not 0 <= value < math.inf:
            raise AtopError(f"--{name} must be a finite number >= 0, got {value}")
    if not 0 <= cfg.clean_fraction <= 1:
        raise AtopError(f"--clean-fraction must be in [0, 1], got {cfg.clean_fraction}")
    if cfg.warmup_epochs < 0:
        raise AtopError(f"--warmup-epochs must be at least 0, got {cfg.warmup_epochs}")
    if cfg.cls_target not in CLS_TARGETS:
        raise AtopError(f"unknown --cls-target {cfg.cls_target!r}; use {' or '.join(CLS_TARGETS)}")
    if cfg.attack_target not in ("classifier", "pipeline"):
        raise AtopError(f"unknown --attack-target {cfg.attack_target!r}; use classifier or pipeline")
    rtm = common.setup_runtime(cfg.device)
    if cfg.bf16 is None:
        cfg.bf16 = common.fast_bf16(rtm.device)
    torch.manual_seed(cfg.seed)
    source = modelio.resolve(source)
    src_card = modelio.read_card(source)
    clf_source = modelio.resolve(classifier_source) if classifier_source else source
    if clf_source != source:
        clf_card = modelio.read_card(clf_source)
        src_card = {**src_card, "classes": clf_card["classes"], "classifier": clf_card["classifier"]}
    train_set, test_set = load_cifar10(cfg.data or None)
    if cfg.limit:
        train_set = train_set.balanced_subset(min(cfg.limit, len(train_set)), seed=cfg.seed)
    eval_set = test_set.balanced_subset(min(cfg.eval_n, len(test_set)))
    rt = cfg.rt_config()

    f_eval = modelio.load_classifier(clf_source)  # with the card's TTA: used for reported accuracy only
    f = f_eval.classifier.to(rtm.device)  # bare classifier (no TTA) inside the training loss
    for p in f.parameters():
        p.requires_grad_(False)
    f_before = {k: v.clone() for k, v in f.state_dict().items()}

    fresh = cfg.mode == "pretrain"  # a purifier without the source's history
    if cfg.mode == "atop":
        g, _ = modelio.load_purifier(source)
        if cfg.arch and cfg.arch != src_card["purifier"]["arch"]:
            try:
                g = carry_weights(g, cfg.arch)
            except AtopError:
                if not cfg.teacher:
                    raise
                g, fresh = create_purifier(cfg.arch), True  # a new shape: it learns from the teacher, from scratch
        cfg.arch = cfg.arch or src_card["purifier"]["arch"]
    else:
        cfg.arch = cfg.arch or "gated-unet"
        g = create_purifier(cfg.arch)
    g = g.to(rtm.device).train()
    teacher = None
    if cfg.teacher:
        if cfg.mode != "atop":
            raise AtopError("--teacher is an option of AToP fine-tuning (atop train atop)")
        teacher, _ = modelio.load_purifier(cfg.teacher)
        teacher = teacher.to(rtm.device).requires_grad_(False).eval()
    d = PatchDiscriminator(cfg.d_width).to(rtm.device).train()
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.d_lr, betas=cfg.betas)
    for o in (opt_g, opt_d):
        for grp in o.param_groups:
            grp["base_lr"] = grp["lr"]
    g_ddp = torch.nn.parallel.DistributedDataParallel(g) if rtm.world > 1 else g
    d_ddp = torch.nn.parallel.DistributedDataParallel(d) if rtm.world > 1 else d
    train_pipe = PurifiedClassifier(g, f, rt)

    local_bs = cfg.batch_size // rtm.world
    steps_per_epoch = len(train_set) // cfg.batch_size or 1
    total = steps_per_epoch * cfg.epochs
    ckpt_dir, start_epoch, elapsed, history = out / "checkpoint", 0, 0.0, []
    if resume:
        tensors, meta = common.load_checkpoint(ckpt_dir)
        common.load_state(g, common.unprefixed("g", tensors), ckpt_dir)
        common.load_state(d, common.unprefixed("d", tensors), ckpt_dir)
        common.load_optimizer_tensors(opt_g, common.unprefixed("og", tensors))
        common.load_optimizer_tensors(opt_d, common.unprefixed("od", tensors))
        start_epoch, elapsed, history = meta["epoch"] + 1, meta["elapsed"], meta["history"]
        if rtm.is_main:
            print(f"resumed from {ckpt_dir} at epoch {start_epoch}")
    out.mkdir(parents=True, exist_ok=True)
    viz = eval_set.images[:: max(1, len(eval_set) // 16)][:16].float() / 255

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        gen = common.epoch_generator(cfg.seed, epoch, stream=rtm.rank)
        perm_gen = common.epoch_generator(cfg.seed, epoch)
        perm = torch.randperm(len(train_set), generator=perm_gen)
        lam = cfg.lam if (cfg.mode == "atop" and epoch >= cfg.warmup_epochs) else 0.0
        bar = common.progress(steps_per_epoch * cfg.batch_size, f"{cfg.mode} {epoch + 1}/{cfg.epochs}", show_progress and rtm.is_main)
        sums = {"l1": 0.0, "gan_g": 0.0, "d": 0.0, "cls": 0.0, "acc": 0.0}
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for o in (opt_g, opt_d):
                for grp in o.param_groups:
                    grp["lr"] = grp["base_lr"] * _lr_factor(step, total)
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size][rtm.rank * local_bs : (rtm.rank + 1) * local_bs]
            x = augment(train_set.images[idx].float().div_(255), gen).to(rtm.device)
            y = train_set.labels[idx].to(rtm.device)
            x_in = x
            if cfg.mode == "atop":
                n_adv = len(x) - int(round(cfg.clean_fraction * len(x)))
                if n_adv > 0:
                    g.eval()
                    with rtm.autocast(cfg.bf16):
                        adv = make_adversarial(cfg, f, train_pipe, x[-n_adv:], y[-n_adv:], gen)
                    g.train()
                    x_in = torch.cat([x[:-n_adv], adv.float()])
            draws = rt_draws(cfg, rt, len(x), gen, rtm.device)
            x_t, mask = random_transform(x_in, rt, draws)
            with rtm.autocast(cfg.bf16):
                out_img = g_ddp(x_t, mask)
                # discriminator step (hinge)
                d_real, d_fake = d_ddp(x, mask), d_ddp(out_img.detach(), mask)
                loss_d = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            with rtm.autocast(cfg.bf16):
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(x_t, mask).float()
                else:
                    target = x
                clean_probs = None
                if cfg.mode == "atop" and cfg.cls_target != "label":
                    with torch.no_grad():
                        clean_probs = cls_targets(cfg.cls_target, f(x), y, len(x) - n_adv)
                l1 = (out_img.float() - target).abs().mean()
                gan_g = -d_ddp(out_img, mask).float().mean()
                loss = l1 + cfg.gan_weight * gan_g
                logits = None
                if lam > 0:
                    logits = f(out_img).float()
                    cls = classification_loss(logits, y, clean_probs)
                    loss = loss + lam * cls
                elif cfg.mode == "atop":  # monitored only (warm-up, or lambda 0): no backward through f
                    with torch.no_grad():
                        logits = f(out_img.detach()).float()
                        cls = classification_loss(logits, y, clean_probs)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            sums["l1"] += l1.item()
            sums["gan_g"] += gan_g.item()
            sums["d"] += loss_d.item()
            if logits is not None:
                sums["cls"] += cls.item()
                sums["acc"] += (logits.argmax(1) == y).float().mean().item()
            bar.update(len(idx) * rtm.world)
            bar.set_postfix(l1=f"{l1.item():.4f}", **({"cls": f"{cls.item():.3f}"} if logits is not None else {}))
        bar.close()
        if not math.isfinite(sums["l1"]):
            raise AtopError(f"training diverged at epoch {epoch + 1}; lower --lr")
        elapsed += time.perf_counter() - t0
        rec = {"epoch": epoch + 1, "lambda": lam, "seconds": round(elapsed, 1),
               **{k: round(v / steps_per_epoch, 5) for k, v in sums.items()}}
        if rtm.is_main:
            g.eval()
            with torch.no_grad():
                vd = draw_rt_inputs(rt, len(viz), 1, torch.Generator().manual_seed(123)).flat()
                p_img, v_t, _ = PurifiedClassifier(g, f, rt).to("cpu").purify(viz, vd)
            save_grid(out / f"grid_epoch{epoch + 1:03d}.png", viz, v_t, p_img)
            g.train()
            history.append(rec)
            tensors = {**common.prefixed("g", g.state_dict()), **common.prefixed("d", d.state_dict()),
                       **common.prefixed("og", common.optimizer_tensors(opt_g)),
                       **common.prefixed("od", common.optimizer_tensors(opt_d))}
            common.save_checkpoint(ckpt_dir, tensors, {"epoch": epoch, "elapsed": elapsed, "history": history,
                                                       "config": common.config_dict(cfg)})
            print(f"epoch {epoch + 1}: {rec}", flush=True)
    g.eval()
    unchanged = all(torch.equal(f_before[k], v) for k, v in f.state_dict().items())
    if not unchanged:  # pragma: no cover - guarded by construction, checked anyway
        raise AtopError("the classifier changed during purifier training")
    result = {"history": history, "classifier_unchanged": unchanged, "g": g}
    if rtm.is_main:
        pipe = PurifiedClassifier(g.cpu(), f_eval, rt).eval()
        acc = clean_accuracy(pipe, eval_set)
        result["clean_acc"] = acc
        _write_folder(cfg, out, clf_source, src_card, g, rt, history, elapsed, acc, len(eval_set), fresh)
        print(f"clean accuracy of the purified pipeline on {len(eval_set)} balanced test images: {acc:.4f}")
    common.teardown(rtm)
    return result


def settle_classifier_swap(card: dict, stage: dict) -> dict:
    """Record in an AToP ``stage`` the classifier it fine-tuned g against (the card's), and retire the card's
    ``pipeline.classifier_swap`` caveat (``atop pack --classifier``: "g was trained against another classifier"),
    which no longer holds once g has been fine-tuned against this one; the swap moves into the stage's record."""
    stage["classifier"] = {k: card["classifier"].get(k) for k in ("arch", "sha256")}
    pipeline = dict(card.get("pipeline") or {})
    swap = pipeline.pop("classifier_swap", None)
    if swap is None:
        return card
    stage["after_classifier_swap"] = swap
    return {**card, "pipeline": pipeline}


def _write_folder(cfg, out, clf_source, src_card, g, rt, history, elapsed, acc, n_eval, fresh):
    # the export, the evaluations and the name describe the source's weights, not the ones trained here; its FLOPs
    # count still holds for the same purifier architecture only
    drop = {"export", "evaluation", "evaluation_of_earlier_weights", "name", *(("flops",) if fresh else ())}
    card = {k: v for k, v in src_card.items() if k not in drop}
    if clf_source.resolve() != out.resolve():
        shutil.copy2(clf_source / src_card["classifier"].get("file", modelio.CLASSIFIER_FILE), out / modelio.CLASSIFIER_FILE)
    stage = {"config": common.config_dict(cfg), "wall_seconds": round(elapsed, 1), "hardware": common.hardware(),
             "command": common.command_line(), "git_commit": common.git_commit(), "torch": torch.__version__,
             "history": history, "classifier_unchanged": True}
    if cfg.teacher:
        t_card = modelio.read_card(cfg.teacher)
        stage["teacher"] = {"folder": cfg.teacher, "arch": t_card["purifier"]["arch"], "sha256": t_card["purifier"].get("sha256")}
    pur = {} if fresh else dict(src_card.get("purifier", {}))  # a fresh student inherits no stages or metrics
    pur.update({"arch": cfg.arch, "file": modelio.PURIFIER_FILE, "rt": rt.to_dict()})
    if cfg.mode == "atop" and "atop" in pur:
        # fine-tuning an already fine-tuned purifier: keep the earlier stages' records (oldest first)
        pur["atop_earlier"] = [*pur.get("atop_earlier", []), pur["atop"]]
    if cfg.mode == "atop":
        card = settle_classifier_swap(card, stage)
    pur["pretraining" if cfg.mode == "pretrain" else "atop"] = stage
    pur.setdefault("metrics", {})[f"{cfg.mode}_clean_acc_k1"] = {"value": acc, "n": n_eval, "note": "balanced test subset, K=1, seed 0"}
    pur["sha256"] = modelio.save_weights(g, out / modelio.PURIFIER_FILE)
    card["purifier"] = pur
    modelio.write_card(out, card)
