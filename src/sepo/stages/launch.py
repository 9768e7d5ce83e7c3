"""How a stage gets its ``accelerate.Accelerator`` (shared by `sepo score` and `sepo train`).

    accelerator = make_accelerator(gradient_accumulation_steps=..., mixed_precision=...)

On a machine without an accelerator device the Accelerator is made with ``cpu=True``: processes started by
``torchrun`` or ``accelerate launch --multi_gpu --num_processes N`` then form one gloo group (MULTI_CPU). With
``cpu=False`` accelerate 1.16 gives each such process a world of its own, and N processes would silently train N
separate models. (``accelerate launch --cpu --num_processes N`` starts ONE process unless an MPI hostfile is given.)

Processes other than the main one log warnings only (each would otherwise repeat every progress line).

A requested engine that accelerate did not set up is an error, not a silent fallback: an FSDP config on CPU
processes (accelerate enables FSDP only on GPU-like devices, and torch's FSDP1 needs an accelerator device) would
otherwise run as plain data parallelism.
"""

from __future__ import annotations

import logging
import os

import torch

from sepo.errors import SepoError


def cpu_only() -> bool:
    """True when torch sees no accelerator device (CUDA, XPU, MPS, ...)."""
    if torch.cuda.is_available():
        return False
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return not (accelerator is not None and accelerator.is_available())


def make_accelerator(**kwargs):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=cpu_only(), **kwargs)
    if not accelerator.is_main_process:
        logging.getLogger("sepo").setLevel(logging.WARNING)
    fsdp_requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_requested and accelerator.distributed_type != DistributedType.FSDP:
        raise SepoError(f"the accelerate config asks for FSDP, but accelerate set up {accelerator.distributed_type.value} "
                        f"on {accelerator.device.type}: it enables FSDP only on GPU-like devices (and torch's FSDP1 "
                        "refuses CPU processes: 'FSDP needs a non-CPU accelerator device'). On CPU processes use a "
                        "data-parallel launch (torchrun, or accelerate launch --multi_gpu --num_processes N)")
    return accelerator
