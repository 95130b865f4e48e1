"""ODG-Q: robust quantization as online domain generalization, at about the cost of natural training.

The paper (Tao & Wong 2022, arXiv 2210.08701) is public only as an abstract; ``docs/odgq.md`` says what it
states, what is inferred here and why. The design: every training step sees the batch under several cheap
adversarial *domains* and minimises a domain-generalization loss over them, so that the quantized model
learns to resist the whole family rather than one attack — and almost every perturbation is paid for by
the backward pass training does anyway.

The domains (each sample of a batch is in exactly one), all inside the L∞ ball of radius
``r = radius_scale·ε`` (default 1.25ε, see below):

``carried``      the sample's perturbation carried over from its previous visit (the previous epoch) and
                 advanced, after every training step, one signed step of ``carry_alpha`` (r/2) along the input
                 gradient that the training backward computes anyway — free adversarial training across
                 epochs: perturbations accumulate into multi-step ones at no crafting cost;
``fgsm``         one fresh signed step of ``alpha`` (1.25r) on the quantized model (straight-through
                 gradients), from the carried perturbation (``fresh_start="carried"``, default) or from a
                 uniform random start (``"uniform"``: FGSM-RS);
``fgsm-cw``      the same step on the Carlini–Wagner margin instead of the cross-entropy;
``fgsm-float``   the same step crafted on the float copy (every quantizer disabled) — another precision,
                 whose perturbations transfer imperfectly to the quantized model: a different domain.

**Cost.** On every ``craft_every``-th step (default 2) a share ``craft_fraction`` (default ½) of the batch gets
a fresh domain — which one rotates through ``fresh_domains`` (default ``fgsm``, ``fgsm-float``) — and the
rest stays ``carried``; the other steps are carried only. Fresh crafting is one forward and one input-only
backward on those samples: on average ``craft_fraction / craft_every`` (¼) of a batch per step. Crafting
every other step on half the batch, rather than every step on a quarter, halves the fixed per-call cost
that dominates small models. The carried domain costs an input gradient at the first layer, a fingerprint
and a bank lookup per step.

**Radius.** Single-step and one-epoch-old perturbations are weaker than the worst case in the ε-ball; building
the domains in a slightly larger ball (1.25ε) compensates. On digits at w4a4 (ε = 0.2, 3 seeds) it raised
APGD accuracy at ε from 52 % to 56 %, PGD-AT's level (FGSM-RS trained at 1.25ε gains too, from 46 % to 52 %);
see ``docs/odgq.md``. ``radius_scale=1`` trains exactly at ε.

Carried perturbations are kept per sample in a :class:`PerturbationBank` keyed by the sample's dataset
index, which :func:`qrobust.fit` hands over before each step (``set_batch_view``). Under crop+flip
augmentation a perturbation is stored in the zero-padded, un-augmented frame of its image: on each visit it
is cropped and flipped like the image, and the updated view is pasted back after the step, so it follows
the image from epoch to epoch (ATTA's trick). A sample seen for the first time starts from a uniform random
point of the ball. With a loader of your own (no indices) images are matched by an exact fingerprint of
their pixels instead; augmented images then never repeat, the bank switches itself off after two epochs
(logged) and the carried domain is a random start.

The domain-generalization loss over the per-domain mean cross-entropies ``L_d`` (``dg``):

``"softmax"``  ``τ·log Σ_d exp(L_d / τ)`` — a smooth worst-domain loss (τ = ``dg_weight``, default 0.5):
               each domain is weighted by ``softmax(L/τ)``, the hardest most;
``"vrex"``     ``mean_d L_d + λ·var_d L_d`` (risk extrapolation, Krueger et al.; λ = ``dg_weight``);
``"mean"``     ``mean_d L_d`` (pooling the domains).

Call :meth:`OdgQ.callback` from :func:`qrobust.fit` (``callbacks=[obj.callback]``) to log each epoch's
per-domain losses and the bank's hit rate into ``metrics.jsonl``.

>>> import torch
>>> from torch import nn
>>> obj = OdgQ(eps=0.1)
>>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
>>> loss, logits = obj(net, torch.rand(8, 4), torch.randint(0, 3, (8,)))
>>> loss.backward(); obj.flush()          # the loop's backward; then the perturbations are stored
>>> len(obj.bank)
8
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.defenses.adversarial import AdversarialObjective
from qrobust.defenses.objectives import register_objective
from qrobust.defenses.perturb import ce_per_sample, clip_linf, cw_per_sample, linf_perturb, random_delta
from qrobust.errors import ConfigError
from qrobust.validation import check_int, check_positive

log = logging.getLogger(__name__)

__all__ = ["DG_LOSSES", "FRESH_DOMAINS", "OdgQ", "PerturbationBank", "dg_combine", "image_fingerprint"]

#: fresh domain → (crafting loss, crafted on the float copy)
FRESH_DOMAINS: dict[str, tuple[str, bool]] = {
    "fgsm": ("ce", False),
    "fgsm-cw": ("cw", False),
    "fgsm-float": ("ce", True),
}
CARRIED = "carried"
FRESH_STARTS = ("carried", "uniform")
DG_LOSSES = ("softmax", "vrex", "mean")
#: below this share of repeated images in an epoch the bank is switched off (augmented data)
MIN_HIT_RATE = 0.05


# ------------------------------------------------------------------------------------------ fingerprints
_FP_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def image_fingerprint(x: torch.Tensor) -> torch.Tensor:
    """One int64 per image: equal for images whose pixels agree at 1/255 resolution (the resolution of the
    uint8 data every dataset here is stored in), different otherwise with overwhelming probability.

    An exact integer hash — pixel levels 0…255 dotted with fixed pseudo-random integer weights small enough
    that the sum cannot overflow — so the value never depends on batch position, device or BLAS.

    >>> x = torch.rand(3, 1, 4, 4)
    >>> bool((image_fingerprint(x) == image_fingerprint(x.flip(0)).flip(0)).all())
    True
    """
    flat = (x.detach().reshape(x.shape[0], -1).clamp(0, 1) * 255).round_().to(torch.int64)
    d = max(flat.shape[1], 1)
    key = (d, str(flat.device))
    w = _FP_WEIGHTS.get(key)
    if w is None:
        bits = 62 - 8 - math.ceil(math.log2(d + 1))
        if bits < 16:
            raise ConfigError(f"images of {d} values are too large to fingerprint exactly")
        g = torch.Generator().manual_seed(0x0D69)
        w = _FP_WEIGHTS[key] = torch.randint(1, 2**bits, (d,), generator=g, dtype=torch.int64).to(flat.device)
    return flat @ w if flat.device.type == "cpu" else (flat * w).sum(dim=1)


class PerturbationBank:
    """Per-sample L∞ perturbations carried between epochs, keyed by :func:`image_fingerprint`.

    Stored on the CPU as int8 codes of δ/ε (resolution ε/127, a quarter of float32's memory: MNIST's 60,000
    images take 47 MB). At most ``capacity`` images are kept; beyond it new images are not stored.
    """

    def __init__(self, eps: float, *, capacity: int = 1_000_000) -> None:
        self.eps = float(eps)
        self.capacity = int(capacity)
        self._slots: dict[int, int] = {}
        self._codes: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self._slots)

    def clear(self) -> None:
        self._slots.clear()
        self._codes = None

    def get(self, keys: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(delta, found)``: the stored perturbations, shaped like ``like`` (zeros where not found)."""
        get = self._slots.get
        slots = torch.tensor([get(k, -1) for k in keys.tolist()], dtype=torch.long)
        found = slots >= 0
        delta = torch.zeros_like(like)
        if self._codes is not None and bool(found.any()):
            codes = self._codes[slots[found]].to(device=like.device, dtype=like.dtype)
            delta[found.to(like.device)] = codes * (self.eps / 127)
        return delta, found.to(like.device)

    def put(self, keys: torch.Tensor, delta: torch.Tensor) -> None:
        """Store (or overwrite) the perturbations of the images ``keys``."""
        codes = (delta.detach() * (127 / self.eps)).round_().clamp_(-127, 127).to(torch.int8).cpu()
        slots = []
        for k in keys.tolist():
            s = self._slots.get(k)
            if s is None and len(self._slots) < self.capacity:
                s = self._slots[k] = len(self._slots)
            slots.append(-1 if s is None else s)
        idx = torch.tensor(slots, dtype=torch.long)
        keep = idx >= 0
        if not bool(keep.any()):
            return
        size = 0 if self._codes is None else self._codes.shape[0]
        if len(self._slots) > size:  # grow geometrically
            new = min(max(len(self._slots), 2 * size, 64), self.capacity)
            grown = torch.zeros((new, *codes.shape[1:]), dtype=torch.int8)
            if self._codes is not None:
                grown[:size] = self._codes
            self._codes = grown
        assert self._codes is not None
        self._codes[idx[keep]] = codes[keep]

    def state_dict(self) -> dict[str, torch.Tensor]:
        keys = torch.tensor(list(self._slots), dtype=torch.int64)
        if self._codes is None or not len(keys):
            return {"keys": keys, "codes": torch.zeros(0, dtype=torch.int8)}
        return {"keys": keys, "codes": self._codes[: len(keys)].clone()}  # slots are 0…n−1 in key order

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.clear()
        if len(state["keys"]):
            self.put(state["keys"], state["codes"].float() * (self.eps / 127))


# ------------------------------------------------------------------------------------------- DG losses
def dg_combine(losses: torch.Tensor, kind: str, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total, c)``: the domain-generalization loss of the per-domain losses, and ``c = ∂total/∂losses``
    (detached) — how the backward pass weights each domain's samples, and whether it pushes their loss
    down (c > 0) or up (c < 0, possible with a large V-REx λ).

    >>> total, c = dg_combine(torch.tensor([1.0, 3.0]), "vrex", 1.0)
    >>> round(total.item(), 4), [round(v, 4) for v in c.tolist()]
    (3.0, [-0.5, 1.5])
    """
    d = losses.numel()
    if kind == "mean" or d == 1:
        return losses.mean(), torch.full_like(losses, 1.0 / d).detach()
    if kind == "vrex":
        mean = losses.mean()
        dev = losses - mean
        return mean + weight * (dev**2).mean(), (1.0 / d + weight * 2.0 * dev / d).detach()
    if kind == "softmax":
        return weight * torch.logsumexp(losses / weight, dim=0), torch.softmax(losses / weight, dim=0).detach()
    raise ConfigError(f"dg must be one of {DG_LOSSES}, got {kind!r}")


# --------------------------------------------------------------------------------------------- ODG-Q
def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


@register_objective("odgq")
class OdgQ(AdversarialObjective):
    """The ODG-Q objective (see the module docstring for the domains, the cost and the DG losses).

    ``eps`` — the threat model's L∞ radius; ``radius_scale`` — the domains' radius ``r`` in units of ε;
    ``alpha`` — the fresh step (default 1.25r); ``carry_alpha`` — the free step that advances every
    perturbation after each training step (default r/2); ``craft_fraction``/``craft_every`` — share of the
    batch crafted fresh on every ``craft_every``-th step; ``fresh_domains`` — rotated from one crafting step
    to the next; ``fresh_start`` — where a fresh step starts; ``dg``/``dg_weight`` — the DG loss and its τ
    (softmax) or λ (vrex); ``bank`` — carry perturbations per sample (``False``: every visit starts from a
    random point); ``bank_capacity`` — most images kept; ``craft_mode`` — see :mod:`qrobust.defenses.perturb`.
    """

    name = "odgq"

    def __init__(
        self,
        *,
        eps: float = 8 / 255,
        radius_scale: float = 1.25,
        alpha: float | None = None,
        carry_alpha: float | None = None,
        craft_fraction: float = 0.5,
        craft_every: int = 2,
        fresh_domains: Sequence[str] | str = ("fgsm", "fgsm-float"),
        fresh_start: str = "carried",
        dg: str = "softmax",
        dg_weight: float = 0.5,
        bank: bool = True,
        bank_capacity: int = 1_000_000,
        craft_mode: str = "train",
    ) -> None:
        super().__init__(eps=eps, craft_mode=craft_mode)
        if isinstance(radius_scale, bool) or not isinstance(radius_scale, (int, float)) \
                or not 1.0 <= radius_scale <= 4.0:
            raise ConfigError(f"radius_scale must be a number in [1, 4] (the domains' radius in units of eps), "
                              f"got {radius_scale!r}")
        self.radius_scale = float(radius_scale)
        #: the L∞ radius the training domains are built in: radius_scale·ε (at most 1)
        self.radius = min(self.radius_scale * self.eps, 1.0)
        self.alpha = check_positive("alpha", alpha) if alpha is not None else 1.25 * self.radius
        self.carry_alpha = check_positive("carry_alpha", carry_alpha) if carry_alpha is not None else self.radius / 2
        if isinstance(craft_fraction, bool) or not isinstance(craft_fraction, (int, float)) \
                or not 0.0 <= craft_fraction <= 1.0:
            raise ConfigError(f"craft_fraction must be in [0, 1], got {craft_fraction!r}")
        self.craft_fraction = float(craft_fraction)
        self.craft_every = check_int("craft_every", craft_every)
        if isinstance(fresh_domains, str):
            fresh_domains = [d.strip() for d in fresh_domains.split(",") if d.strip()]
        fresh = list(fresh_domains)
        if any(d not in FRESH_DOMAINS for d in fresh) or (not fresh and self.craft_fraction > 0):
            raise ConfigError(f"fresh_domains must be a non-empty list of {sorted(FRESH_DOMAINS)}, got "
                              f"{fresh!r}")
        self.fresh_domains = fresh
        if fresh_start not in FRESH_STARTS:
            raise ConfigError(f"fresh_start must be one of {FRESH_STARTS}, got {fresh_start!r}")
        self.fresh_start = fresh_start
        if dg not in DG_LOSSES:
            raise ConfigError(f"dg must be one of {DG_LOSSES}, got {dg!r}")
        self.dg = dg
        if isinstance(dg_weight, bool) or not isinstance(dg_weight, (int, float)) or not math.isfinite(dg_weight) \
                or dg_weight < 0 or (dg == "softmax" and dg_weight == 0):
            raise ConfigError(f"dg_weight must be a finite number ≥ 0 (> 0 for dg='softmax'), got {dg_weight!r}")
        self.dg_weight = float(dg_weight)
        if not isinstance(bank, bool):
            raise ConfigError(f"bank must be True or False, got {bank!r}")
        self.bank_enabled = bank
        if isinstance(bank_capacity, bool) or not isinstance(bank_capacity, int) or bank_capacity < 1:
            raise ConfigError(f"bank_capacity must be a positive integer, got {bank_capacity!r}")
        self._bank = PerturbationBank(self.radius, capacity=bank_capacity)
        self._pending: dict[str, Any] | None = None
        self._view: Any = None
        self._step = 0
        self._stats: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------ plumbing
    @property
    def bank(self) -> PerturbationBank:
        return self._bank

    def config(self) -> dict[str, Any]:
        out = super().config()
        out["bank"] = out.pop("bank_enabled")
        out["bank_capacity"] = self._bank.capacity
        return out

    def on_epoch_start(self, epoch: int) -> None:
        """Called by :func:`qrobust.fit` before each epoch: stores the last step's perturbations, and
        switches the bank off when the images of the last epoch hardly ever repeated (augmented data)."""
        self.flush()
        lookups, hits = self._stats.get("lookups", 0), float(self._stats.get("hits", 0))
        if self.bank_enabled and epoch >= 2 and lookups > 0 and hits / lookups < MIN_HIT_RATE:
            log.warning(
                "ODG-Q: only %.1f%% of last epoch's images had been seen before (data augmentation changes "
                "them every epoch?); carried perturbations are switched off and every sample starts from a "
                "random point — raise craft_fraction (e.g. 0.5) to keep the recipe strong", 100 * hits / lookups)
            self.bank_enabled = False
            self._bank.clear()
        self._stats = {}

    def epoch_stats(self) -> dict[str, float]:
        """Per-domain mean losses (``loss_<domain>``) and sample counts (``n_<domain>``) so far this epoch,
        the bank's hit rate and size."""
        out: dict[str, float] = {}
        for k, v in self._stats.items():
            if k.startswith("sum_"):
                n = self._stats[f"n_{k[4:]}"]
                out[f"loss_{k[4:]}"] = float(v) / max(n, 1)
                out[f"n_{k[4:]}"] = float(n)
        lookups = self._stats.get("lookups", 0)
        out["bank_hit_rate"] = float(self._stats.get("hits", 0)) / lookups if lookups else 0.0
        out["bank_size"] = float(len(self._bank))
        return out

    def callback(self, record: dict[str, Any], model: nn.Module) -> None:
        """A :func:`qrobust.fit` callback that adds ``odgq_*`` keys (per-domain losses, bank hit rate)."""
        for k, v in self.epoch_stats().items():
            record[f"odgq_{k}"] = v

    def state_dict(self) -> dict[str, Any]:
        """The carried perturbations and the step counter, so that a resumed run can continue them."""
        self.flush()
        return {"bank": self._bank.state_dict(), "step": self._step, "bank_enabled": self.bank_enabled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = None
        self._bank.load_state_dict(state["bank"])
        self._step = int(state.get("step", 0))
        self.bank_enabled = bool(state.get("bank_enabled", self.bank_enabled))

    def _count(self, key: str, value: Any) -> None:
        self._stats[key] = self._stats.get(key, 0) + value

    # ------------------------------------------------------------------------------------ the steps
    def flush(self) -> None:
        """Advance the previous step's perturbations along the input gradient its backward left on the
        training input, and store them (nothing happens if that backward did not run)."""
        p, self._pending = self._pending, None
        if p is None or p["x_train"].grad is None or p["keys"] is None:
            return
        g = p["x_train"].grad
        if p["sign"] is not None:
            g = _view(p["sign"].to(g.dtype), g) * g
        x = p["x"]
        x_new = clip_linf(p["x_train"].detach() + self.carry_alpha * g.sign(), x, self.radius)
        delta = x_new - x
        cf = p.get("crop_flip")
        self._bank.put(p["keys"], delta if cf is None else cf.paste(p["frame"], delta))

    def set_batch_view(self, view: Any) -> None:
        """Called by :func:`qrobust.fit` before each step with the loader's
        :class:`~qrobust.data.BatchView` (or None): the next batch's dataset indices key the carried
        perturbations, and under crop+flip augmentation each is kept in the zero-padded, un-augmented frame
        — cropped and flipped like its image on every visit and pasted back after the step — so it follows
        the image across epochs. Without a view (a loader of your own) images are matched by
        :func:`image_fingerprint`, which augmented images never repeat."""
        self._view = view

    def _carried(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Each sample's carried perturbation (a uniform random start where there is none), and how to
        store it back: ``keys`` and, for augmented batches, the padded ``frame`` and its ``crop_flip``."""
        view, self._view = self._view, None
        if not self.bank_enabled:
            return random_delta(x, self.radius), {"keys": None}
        if view is None or view.index.numel() != x.shape[0]:
            keys, cf = image_fingerprint(x), None
        else:
            keys, cf = view.index.to(torch.int64), view.augment
        like = x if cf is None else cf.pad(x)
        delta, found = self._bank.get(keys, like)
        self._count("lookups", x.shape[0])
        self._count("hits", found.sum())
        if not bool(found.all()):
            delta = torch.where(_view(found, like), delta, random_delta(like, self.radius))
        if cf is None:
            return delta, {"keys": keys}
        return cf.crop(delta), {"keys": keys, "frame": delta, "crop_flip": cf}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.flush()
        x = x.detach()
        n = x.shape[0]
        delta, store = self._carried(x)
        n_fresh = int(round(self.craft_fraction * n)) if self._step % self.craft_every == 0 else 0
        fresh = None
        if n_fresh > 0:
            name = self.fresh_domains[(self._step // self.craft_every) % len(self.fresh_domains)]
            loss_kind, on_float = FRESH_DOMAINS[name]
            idx = torch.randperm(n)[:n_fresh].to(x.device)
            loss_fn = (ce_per_sample if loss_kind == "ce" else cw_per_sample)(y[idx])
            start = delta[idx] if self.fresh_start == "carried" else "uniform"
            x_fresh = linf_perturb(model, x[idx], loss_fn, eps=self.radius, alpha=self.alpha, steps=1, start=start,
                                   mode=self.craft_mode, float_copy=on_float)
            delta[idx] = x_fresh - x[idx]
            fresh = torch.zeros(n, dtype=torch.bool, device=x.device)
            fresh[idx] = True
        self._step += 1

        x_train = clip_linf(x + delta, x, self.radius).requires_grad_(True)
        logits = model(x_train)
        sign = None
        if fresh is None or n_fresh == n:  # one domain in this step: its mean loss
            total = F.cross_entropy(logits.float(), y)
            dom = CARRIED if fresh is None else name
            self._count(f"sum_{dom}", total.detach() * n)
            self._count(f"n_{dom}", n)
        else:
            per_sample = F.cross_entropy(logits.float(), y, reduction="none")
            dom_losses = torch.stack([per_sample[~fresh].mean(), per_sample[fresh].mean()])
            total, c = dg_combine(dom_losses, self.dg, self.dg_weight)
            # the sign each sample's input gradient carries in the backward (c < 0 flips it; see dg_combine)
            sign = torch.where(fresh, torch.where(c[1] >= 0, 1.0, -1.0), torch.where(c[0] >= 0, 1.0, -1.0))
            for dom, loss, count in ((CARRIED, dom_losses[0], n - n_fresh), (name, dom_losses[1], n_fresh)):
                self._count(f"sum_{dom}", loss.detach() * count)
                self._count(f"n_{dom}", count)
        self._pending = {"x_train": x_train, "x": x, "sign": sign, **store}
        return total, logits

