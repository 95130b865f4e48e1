"""Square Attack (Andriushchenko et al. 2020): score-based random search, L∞ and L2, no gradients.

Each query proposes a change confined to a random square window of side ``s`` and keeps it if the margin
``z_y − max_{j≠y} z_j`` (targeted: ``max_{j≠t} z_j − z_t``) went down or the sample became adversarial.
The window's area shrinks on the schedule ``p`` (fraction of the image): ``p_init`` halved after 10, 50,
200, 500, 1000, 2000, 4000, 6000 and 8000 iterations of a 10 000-query budget (rescaled to ``n_queries``
when ``rescale_schedule``).

* **L∞** — start from random vertical stripes ``x ± ε``; a proposal sets the window to ``x ± ε`` with one
  random sign per channel (a proposal that would change nothing is redrawn).
* **L2** — start from a grid of signed "pseudo-Gaussian" squares scaled to norm ε; a proposal moves the
  mass of a second window into the first, adds a fresh signed pattern there, and renormalizes the whole
  perturbation to ε.

Window positions, signs and patterns are drawn per sample and the whole batch proposes at once. Every
sample stops at its first success; its number of model evaluations (the initial one included, all
restarts summed) is left in ``last_queries`` (``(N,)`` int64; 0 for samples not attacked). The budget
``n_queries`` bounds each restart's evaluations of a sample, the initial one included.
Gradient settings are ignored: the model is only queried for logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qrobust.attacks.base import Attack, default_eps, lp_norm
from qrobust.attacks.losses import margin_loss
from qrobust.errors import ConfigError, InputError
from qrobust.validation import check_int, check_positive

_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
             (8000, 256))


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _rectangle(a: int, b: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An ``a×b`` bump: at Chebyshev distance ``d`` from the centre, ``Σ_{k≥d} 1/(k+1)²``; unit L2 norm."""
    if a == 0:
        return torch.zeros(0, b, device=device, dtype=dtype)
    i = torch.arange(a, device=device)[:, None]
    j = torch.arange(b, device=device)[None, :]
    d = torch.maximum((i - a // 2).abs(), (j - b // 2).abs())
    rings = max(a // 2 + 1, b // 2 + 1)
    w = 1.0 / torch.arange(1, rings + 1, device=device, dtype=dtype) ** 2
    tail = w.flip(0).cumsum(0).flip(0)  # tail[d] = Σ_{k=d}^{rings-1} w_k
    out = tail[d]
    return out / out.norm()


def square_pattern(
    s: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The L2 proposal pattern of side ``s``: a bump on the top half, its negative below; unit norm.

    >>> p = square_pattern(5)
    >>> p.shape, round(float(p.norm()), 6), bool(p[0].sum() > 0), bool(p[-1].sum() < 0)
    (torch.Size([5, 5]), 1.0, True, True)
    """
    device = torch.device(device)
    top = _rectangle(s // 2, s, device, dtype)
    bottom = -_rectangle(s - s // 2, s, device, dtype)
    p = torch.cat([top, bottom], dim=0)
    return p / p.norm()


class Square(Attack):
    """Score-based Square Attack (``eps``, ``norm`` "Linf"/"L2", ``n_queries``, ``p_init``, ``restarts``).

    ``eps=None`` means 8/255 in L∞ and 0.5 in L2.
    """

    black_box = True
    randomized = True
    single_step = False
    supports_targeted = True
    diagnostic_role = None
    steps_in_label = False
    aliases = {"n_restarts": "restarts"}

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | None = None,
        norm: str = "Linf",
        n_queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
        rescale_schedule: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=default_eps(eps, norm), norm=norm, **kwargs)
        self.n_queries = check_int("n_queries", n_queries)
        self.p_init = check_positive("p_init", p_init, maximum=1.0)
        self.restarts = check_int("restarts", restarts)
        if not isinstance(rescale_schedule, bool):
            raise ConfigError(f"rescale_schedule must be True or False, got {rescale_schedule!r}")
        self.rescale_schedule = rescale_schedule
        #: model evaluations per sample in the last call (all restarts), int64 on the input's device side
        self.last_queries: torch.Tensor | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        """``square`` (L∞) or ``square-l2``: the registry name of this norm."""
        return "square" if self.norm == "Linf" else "square-l2"

    # ------------------------------------------------------------------------------------ schedule
    def _p(self, it: int) -> float:
        if self.rescale_schedule:
            it = int(it / self.n_queries * 10000)
        div = 1
        for threshold, d in _SCHEDULE:
            if it > threshold:
                div = d * 2
        return self.p_init / div

    def _margin(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(how far from success — lower is better, ≤ 0 once adversarial; success)."""
        logits = self.logits(x)
        return -margin_loss(logits, y, targeted=self.is_targeted), self.is_success(logits, y)

    def _window(self, vh: torch.Tensor, vw: torch.Tensor, s: int, h: int, w: int) -> torch.Tensor:
        rows = torch.arange(h, device=vh.device)[None, :]
        cols = torch.arange(w, device=vh.device)[None, :]
        in_r = (rows >= vh[:, None]) & (rows < vh[:, None] + s)
        in_c = (cols >= vw[:, None]) & (cols < vw[:, None] + s)
        return (in_r[:, :, None] & in_c[:, None, :])[:, None]  # (n, 1, h, w)

    @staticmethod
    def _index(vh: torch.Tensor, vw: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ar = torch.arange(s, device=vh.device)
        b = torch.arange(vh.shape[0], device=vh.device)[:, None, None]
        return b, (vh[:, None] + ar)[:, :, None], (vw[:, None] + ar)[:, None, :]

    # ------------------------------------------------------------------------------------------ runs
    def _run(
        self, x: torch.Tensor, y: torch.Tensor, queries: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        if self.norm == "Linf":
            # the two corners of each pixel's ε-interval, projected once: every L∞ proposal picks between
            # them inside its window, so no proposal needs a projection of its own
            lo, hi = self.project(x - self.eps, x), self.project(x + self.eps, x)
            x_best = torch.where(self.rademacher((n, c, 1, w)) > 0, hi, lo)
        else:
            x_best = self._init_l2(x)
        m_best, fooled = self._margin(x_best, y)
        queries += 1
        # the samples still attacked, gathered once and gathered again only when some succeed: a query then
        # touches just the proposal's window, its forward pass and the per-sample comparison
        act = (~fooled).nonzero().squeeze(1)
        src = (lo, hi) if self.norm == "Linf" else (x,)
        src_a, xb_a, mb_a, y_a = [t[act] for t in src], x_best[act], m_best[act], y[act]
        q_a = torch.zeros_like(act)
        for it in range(self.n_queries - 1):
            if act.numel() == 0:
                break
            p = self._p(it)
            if self.norm == "Linf":
                x_new = self._propose_linf(src_a[0], src_a[1], xb_a, p)
            else:
                x_new = self._propose_l2(src_a[0], xb_a, p)
            m_new, f_new = self._margin(x_new, y_a)
            q_a += 1
            keep = (m_new < mb_a) | f_new
            xb_a = torch.where(_per_sample(keep, xb_a), x_new, xb_a)
            mb_a = torch.where(keep, m_new, mb_a)
            if bool(f_new.any()):  # write the successes back and drop them from the working set
                done, stay = act[f_new], ~f_new
                x_best[done], m_best[done], fooled[done] = xb_a[f_new], mb_a[f_new], True
                queries[act] += q_a
                act, xb_a, mb_a, y_a = act[stay], xb_a[stay], mb_a[stay], y_a[stay]
                src_a, q_a = [t[stay] for t in src_a], torch.zeros_like(act)
        x_best[act], m_best[act] = xb_a, mb_a
        queries[act] += q_a
        return x_best, fooled, -m_best

    def _propose_linf(self, lo: torch.Tensor, hi: torch.Tensor, x_best: torch.Tensor, p: float) -> torch.Tensor:
        """A random square window set to one ε-corner per channel (``lo`` or ``hi``, the projected x ∓ ε);
        a proposal equal to the current point would waste a query, so its signs are drawn again (until they
        differ, in one draw).

        Only the ``s×s`` windows are read and written (gathered per sample through a channels-last view), so
        a proposal costs O(n·c·s²), not O(n·c·h·w)."""
        n, c, h, w = x_best.shape
        s = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
        vh = self.randint(0, h - s + 1, (n,))
        vw = self.randint(0, w - s + 1, (n,))
        b, r, cc = self._index(vh, vw, s)

        def window(t: torch.Tensor) -> torch.Tensor:  # (n, s, s, c): each sample's own window
            return t.permute(0, 2, 3, 1)[b, r, cc]

        lo_w, hi_w, best_w = window(lo), window(hi), window(x_best)
        up = self.rademacher((n, c, 1, 1)).view(n, 1, 1, c) > 0
        new_w = torch.where(up, hi_w, lo_w)
        redo = (new_w == best_w).reshape(n, -1).all(dim=1).nonzero().squeeze(1)
        if redo.numel():
            # the window already holds exactly these corners: drawing the signs again until they differ is
            # flipping a uniformly drawn non-empty subset of the channels (of those whose corners differ in the
            # window; beyond 16 channels, where a repeat has odds below 2⁻¹⁶, any subset), done in one draw
            if c <= 16:
                bits = torch.arange(c, device=up.device)
                flip = self.randint(1, 2**c, (redo.numel(),))[:, None] >> bits & 1 == 1
            else:
                flip = self.rademacher((redo.numel(), c)) > 0
            flip = flip.view(-1, 1, 1, c)
            new_w[redo] = torch.where(up[redo] ^ flip, hi_w[redo], lo_w[redo])
        x_new = x_best.clone()
        x_new.permute(0, 2, 3, 1)[b, r, cc] = new_w
        return x_new

    def _init_l2(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        s = max(min(h, w) // 5, 1)
        delta = torch.zeros_like(x)
        tops = [(h - 5 * s) // 2 + k * s for k in range(h // s)]
        lefts = [(w - 5 * s) // 2 + k * s for k in range(w // s)]
        for ph in (t for t in tops if t < h):
            for pw in (t for t in lefts if t < w):
                pat = square_pattern(s, x.device, x.dtype)
                if bool(self.rademacher((1,)) > 0):
                    pat = pat.t()
                hh, ww = min(s, h - ph), min(s, w - pw)
                delta[:, :, ph : ph + hh, pw : pw + ww] += pat[:hh, :ww] * self.rademacher((n, c, 1, 1))
        delta = delta / _per_sample(lp_norm(delta, "L2").clamp_min(1e-12), delta)
        return self.project(x + self.eps * delta, x)

    def _propose_l2(self, x: torch.Tensor, x_best: torch.Tensor, p: float) -> torch.Tensor:
        assert self.eps is not None
        n, c, h, w = x.shape
        s = max(int(round(math.sqrt(p * h * w))), 3)
        s += 1 - s % 2  # odd
        s = min(s, h, w)
        delta = x_best - x
        vh, vw = self.randint(0, h - s + 1, (n,)), self.randint(0, w - s + 1, (n,))
        vh2, vw2 = self.randint(0, h - s + 1, (n,)), self.randint(0, w - s + 1, (n,))
        b, r, cc = self._index(vh, vw, s)
        cl = delta.permute(0, 2, 3, 1)  # a view: (n, h, w, c)
        old = cl[b, r, cc].permute(0, 3, 1, 2)  # (n, c, s, s): the window the mass moves into
        old_norm = old.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()
        both = self._window(vh, vw, s, h, w) | self._window(vh2, vw2, s, h, w)
        norm_img = _per_sample(lp_norm(delta, "L2"), delta)
        norm_win = _per_sample(lp_norm(delta * both, "L2"), delta)
        pat = square_pattern(s, x.device, x.dtype)
        flip = _per_sample(self.rademacher((n,)) > 0, x)
        pats = torch.where(flip, pat.t().expand(n, 1, s, s), pat.expand(n, 1, s, s))
        new = pats * self.rademacher((n, c, 1, 1)) + old / (old_norm + 1e-12)
        budget = ((self.eps**2 - norm_img**2).clamp_min(0.0) / c + norm_win**2).sqrt()
        new = new / (new.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt() + 1e-12) * budget
        delta = torch.where(self._window(vh2, vw2, s, h, w), torch.zeros_like(delta), delta)
        cl = delta.permute(0, 2, 3, 1)
        cl[b, r, cc] = new.permute(0, 2, 3, 1)
        delta = delta / _per_sample(lp_norm(delta, "L2").clamp_min(1e-12), delta)
        return self.project(x + self.eps * delta, x)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise InputError(f"Square needs image batches N×C×H×W, got shape {tuple(x.shape)}")
        queries = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

        def single(
            xs: torch.Tensor, ys: torch.Tensor, idx: torch.Tensor, need_final: bool
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            q = torch.zeros(xs.shape[0], dtype=torch.long, device=xs.device)
            out = self._run(xs, ys, q)
            queries[idx] += q
            return out

        try:
            return self.run_restarts(x, y, self.restarts, single,
                                     draw=lambda xx: torch.arange(xx.shape[0], device=xx.device))
        finally:
            self.last_queries = queries.cpu()
