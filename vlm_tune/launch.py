"""How the training processes were started, and whether they form one data-parallel group.

`torchrun --nproc_per_node N` (and `accelerate launch --multi_gpu`) start N processes and tell each its rank
through WORLD_SIZE / RANK / LOCAL_RANK. On GPUs accelerate joins them with NCCL. Without a GPU it joins them
(gloo) only when told to run on the CPU, so `cpu_group()` says when to ask; otherwise every process would
train a full copy of its own and all of them would write into the same run folder.
`accelerate launch --cpu --num_processes N` starts one process whatever N is (several need mpirun), which
`launch_problem` refuses too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

TORCHRUN_CPU = "torchrun --standalone --nproc_per_node N -m vlm_tune.train RECIPE.yaml"  # the README's command


def launched_world_size(env: Mapping[str, str] = os.environ) -> int:
    """The number of processes the launcher started (1 without a launcher), as accelerate reads it."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return 1


def cpu_group(cuda_available: bool, env: Mapping[str, str] = os.environ) -> bool:
    """True when several processes were started on a machine without a GPU: they must join a CPU (gloo) group."""
    return launched_world_size(env) > 1 and not cuda_available


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def launch_problem(num_processes: int, env: Mapping[str, str] = os.environ) -> Optional[str]:
    """Why the processes started cannot train together (one line), or None.

    Args:
        num_processes: the size of the group the accelerator formed.
        env: the environment the launcher left.
    """
    launched = launched_world_size(env)
    if launched > 1 and num_processes != launched:
        return (
            f"{launched} processes were started (WORLD_SIZE={launched}) but they formed a group of {num_processes}: "
            f"each would train a full copy into the same run folder. On CPUs start them with `{TORCHRUN_CPU}`"
        )
    if launched == 1 and _flag(env, "ACCELERATE_USE_CPU") and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return (
            f"`accelerate launch --cpu --num_processes N` started one process, not N (accelerate starts several CPU "
            f"processes only through mpirun): use `{TORCHRUN_CPU}`, or drop --num_processes for one process"
        )
    return None
