"""Suite-wide test settings: one torch thread (the tiny test models gain nothing from more, and the
machine has two cores), no progress bars."""

import os

import torch

os.environ.setdefault("QROBUST_NO_PROGRESS", "1")
torch.set_num_threads(1)
