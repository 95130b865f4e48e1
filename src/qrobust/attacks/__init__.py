"""How inputs are perturbed: one attack per file on one typed base (:class:`Attack`).

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
>>> atk = make_attack("pgd", model, eps=0.1, steps=3, seed=0)
>>> x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
>>> bool(((atk(x, y) - x).abs() <= 0.1).all())
True
>>> sorted(ATTACKS)[:4]
['apgd-ce', 'apgd-dlr', 'apgd-t', 'bim']
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qrobust.attacks.apgd import APGD
from qrobust.attacks.apgdt import APGDT
from qrobust.attacks.base import Attack, lp_norm, project
from qrobust.attacks.bim import BIM
from qrobust.attacks.cw import CW
from qrobust.attacks.cwlinf import CWLinf
from qrobust.attacks.diva import DIVA
from qrobust.attacks.external import External, is_foreign_attack
from qrobust.attacks.fgsm import FGSM
from qrobust.attacks.mifgsm import MIFGSM
from qrobust.attacks.pgd import PGD
from qrobust.attacks.pgdl2 import PGDL2
from qrobust.attacks.pgdpp import PGDpp
from qrobust.attacks.rfgsm import RFGSM
from qrobust.attacks.spsa import SPSA
from qrobust.attacks.square import Square
from qrobust.attacks.transfer import Transfer
from qrobust.errors import ConfigError

#: every attack by its lowercase name; some names share a class and differ by a preset (see PRESETS)
ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "rfgsm": RFGSM,
    "bim": BIM,
    "pgd": PGD,
    "pgdl2": PGDL2,
    "pgd++": PGDpp,
    "mifgsm": MIFGSM,
    "cw": CW,
    "cwlinf": CWLinf,
    "apgd-ce": APGD,
    "apgd-dlr": APGD,
    "apgd-t": APGDT,
    "square": Square,
    "square-l2": Square,
    "spsa": SPSA,
    "transfer": Transfer,
    "diva": DIVA,
}

#: the settings a name implies on top of its class's defaults
PRESETS: dict[str, dict[str, Any]] = {
    "apgd-ce": {"loss": "ce"},
    "apgd-dlr": {"loss": "dlr"},
    "square": {"norm": "Linf"},
    "square-l2": {"norm": "L2"},
}


def available_attacks() -> list[str]:
    return sorted(ATTACKS)


def make_attack(name: str, model: nn.Module, **kwargs: Any) -> Attack:
    """Build the attack registered as ``name`` (case-insensitive) on ``model`` with ``kwargs``."""
    key = name.lower() if isinstance(name, str) else name
    if key not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; available: {', '.join(available_attacks())}")
    for k, v in PRESETS.get(key, {}).items():
        if k in kwargs and kwargs[k] != v:
            raise ConfigError(f"attack {key!r} implies {k}={v!r}, got {k}={kwargs[k]!r}; use that name")
        kwargs[k] = v
    return ATTACKS[key](model, **kwargs)


__all__ = [
    "PGDpp",
    "External",
    "is_foreign_attack",
    "APGD", "APGDT", "ATTACKS", "BIM", "CW", "CWLinf", "DIVA", "FGSM", "MIFGSM", "PGD", "PGDL2", "PRESETS", "RFGSM",
    "SPSA", "Attack", "Square", "Transfer", "available_attacks", "lp_norm", "make_attack", "project",
]
