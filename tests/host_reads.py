"""Counting the tensor calls that make the host wait for the device (on CUDA, each is a synchronisation)."""

from __future__ import annotations

import os
import traceback

import torch


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts .item/.tolist/.cpu/bool()/float()/… calls while active (usable on CPU, where nothing really waits)."""

    SYNCING = ("__bool__", "item", "tolist", "cpu", "__float__", "__int__", "numpy", "__index__")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.SYNCING:
            # Adam reads its `step` counter with .item(): a host tensor (train.py keeps it there), so no sync.
            caller = traceback.extract_stack(limit=3)[0].filename
            self.count += f"torch{os.sep}optim{os.sep}" not in caller
        return func(*args, **(kwargs or {}))
