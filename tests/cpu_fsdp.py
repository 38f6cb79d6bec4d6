"""`python -m vlm_tune.train` under accelerate's FSDP on CPU processes (gloo), for tests and `--tiny` benchmarks.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 \\
        tests/cpu_fsdp.py RECIPE.yaml [key=value ...]

accelerate 1.15 turns an FSDP config into FSDP only on GPU-like backends (accelerate/state.py); CPU processes
become MULTI_CPU and the FSDP plugin is dropped. This entry point sets the state to FSDP once accelerate has
built it. Everything else (accelerate's FSDP2 prepare, torch's fully_shard over gloo, vlm_tune) runs as on GPUs.
With CPU_FSDP_SHARDS=file.json, the main process writes each parameter's full and local (shard) shape after
`prepare`, so a test can see what was sharded.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def allow_fsdp_on_cpu() -> None:
    """Make accelerate keep the FSDP plugin of CPU (MULTI_CPU) processes."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    build = AcceleratorState.__init__

    def build_then_shard(self, *args, fsdp_plugin=None, **kwargs):
        build(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None:  # the first call (from Accelerator); later ones copy MULTI_CPU back
            self.fsdp_plugin = fsdp_plugin
        if getattr(self, "fsdp_plugin", None) is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP

    AcceleratorState.__init__ = build_then_shard


def record_shards(path: str) -> None:
    """After `vlm_tune.distributed.prepare`, write {name: [full shape, local shape, dtype]} (main process)."""
    import vlm_tune.distributed as distributed
    import vlm_tune.train as train_module

    real_prepare = distributed.prepare

    def prepare_and_record(accelerator, model, optimizer):
        model, optimizer = real_prepare(accelerator, model, optimizer)
        if accelerator.is_main_process:
            shapes = {
                name: [list(p.shape), list(p.to_local().shape if hasattr(p, "to_local") else p.shape), str(p.dtype)]
                for name, p in model.named_parameters()
            }
            Path(path).write_text(json.dumps(shapes))
        return model, optimizer

    train_module.prepare = prepare_and_record


if __name__ == "__main__":
    allow_fsdp_on_cpu()
    if os.environ.get("CPU_FSDP_SHARDS"):
        record_shards(os.environ["CPU_FSDP_SHARDS"])
    from vlm_tune.train import main

    sys.exit(main(sys.argv[1:]))
