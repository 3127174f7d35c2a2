"""`axolotl train` on a machine without GPUs: one process of a `torchrun` launch.

Usage, from the repository root with it on ``PYTHONPATH``::

    python -m torch.distributed.run --nproc_per_node 2 -m tests.support.cpu_launch CONFIG

Each process runs what ``axolotl train CONFIG --launcher torchrun`` runs in it
(``python -m axolotl.cli.train CONFIG``), after the changes below. Each supplies only
what a machine without an accelerator lacks, for the tests and never in the package, and
public settings come first: an environment variable, then a config key (``CPU_KEYS``,
which the tests' configs add), and a wrapped function only where no setting exists.
Read in Axolotl 0.19.0 (``src/axolotl/...``), accelerate 1.13, transformers 5.16:

1. **Accelerate must count the processes** (environment, DDP and FSDP runs):
   ``ACCELERATE_USE_CPU=true``. Without an accelerator, the Trainer's arguments set up
   accelerate's state as one process unless told to use the CPU, so every process trains
   alone on the whole data set (no gradient all-reduce, ``world_size`` 1).
2. **The model loads on the CPU** (config key ``max_memory: {cpu: ...}``). Under DDP
   ``utils/config/__init__.py`` ``normalize_config`` sets ``device_map`` to
   ``{"": LOCAL_RANK}``, an accelerator index, whatever the config says, and
   ``from_pretrained`` fails ("Cannot access accelerator device"). The loader
   (``loaders/model.py``) recomputes the map from ``max_memory`` when it is set.
   DeepSpeed ZeRO-3 and FSDP drop the map themselves.
3. **The device mesh is built on the CPU** (wrapped: accelerate's
   ``ParallelismConfig.build_device_mesh``). ``utils/distributed.py``
   ``build_parallelism_config`` builds the data-parallel mesh of every run of several
   processes (DDP too: ``dp_shard_size`` is the world size) with
   ``build_device_mesh("cuda")``, hard-coded; no key changes it. The wrapper builds the
   same mesh on ``"cpu"`` when CUDA is absent.
4. **DeepSpeed's process group is gloo** (wrapped: accelerate's
   ``PartialState._prepare_backend``, DeepSpeed configs only). DeepSpeed's state cannot
   be accelerate's CPU state (it requires ``cpu`` false), and without an accelerator
   accelerate then picks no backend and counts one process: DeepSpeed refuses the
   batch (``train_batch_size ... 4 != 2 * 2 * 2``) or each process trains alone. The HF
   Trainer's way out, a state set up beforehand with ``PartialState(backend="gloo")`` and
   ``accelerator_config: {use_configured_state: true}`` (``engine_worker.py``), does not
   reach Axolotl 0.19: the Trainer's arguments pop that key before Axolotl's
   ``create_accelerator_and_postprocess`` reads it, so Axolotl resets the state and
   accelerate rebuilds it from the environment. The wrapper makes gloo the backend
   accelerate picks when none is given in a ``torchrun`` process (``LOCAL_RANK`` set)
   without CUDA, which is what it picks for its own CPU state.
5. **FSDP is turned on for CPU processes** (wrapped: accelerate's
   ``AcceleratorState.__init__``, non-DeepSpeed configs). Accelerate 1.13 makes its state
   FSDP's only for GPU-like process groups; on CPU (change 1) it keeps ``MULTI_CPU`` and
   the run silently trains DDP with the FSDP plugin ignored. The wrapper makes the state
   FSDP's, with the plugin accelerate was given (Axolotl's ``fsdp_config``), as accelerate
   does on GPUs, when the state is created: the Trainer then sees FSDP from its start
   (its checkpoints are FSDP's, ``pytorch_model_fsdp.bin``), and ``train()`` shards the
   model with ``fully_shard`` under ``fsdp_version: 2``.
"""

from __future__ import annotations

import functools
import os
import sys

# Config keys a machine without GPUs needs for a run of several processes (change 2).
CPU_KEYS = {"max_memory": {"cpu": "16GiB"}}


def mesh_on_cpu() -> None:
    """Change 3: build accelerate's device meshes on the CPU when CUDA is absent."""
    import torch
    from accelerate.parallelism_config import ParallelismConfig

    if torch.cuda.is_available():
        return
    build = ParallelismConfig.build_device_mesh

    @functools.wraps(build)
    def build_on_cpu(self, device_type: str):
        return build(self, "cpu" if device_type == "cuda" else device_type)

    ParallelismConfig.build_device_mesh = build_on_cpu


def gloo_by_default() -> None:
    """Change 4: accelerate picks gloo in a torchrun process without CUDA."""
    import torch
    from accelerate.state import PartialState

    if torch.cuda.is_available():
        return
    prepare = PartialState._prepare_backend

    @functools.wraps(prepare)
    def prepare_gloo(self, cpu=False, sagemaker_dp=False, backend=None):
        if backend is None and os.environ.get("LOCAL_RANK") is not None:
            backend = "gloo"
        return prepare(self, cpu, sagemaker_dp, backend)

    PartialState._prepare_backend = prepare_gloo


def fsdp_on_cpu() -> None:
    """Change 5: accelerate's state is FSDP's for CPU processes given an FSDP plugin."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    @functools.wraps(init)
    def init_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init_fsdp


def uses_deepspeed(config: str) -> bool:
    """Whether the config at ``config`` trains under DeepSpeed."""
    import yaml

    with open(config, encoding="utf-8") as f:
        return bool(yaml.safe_load(f).get("deepspeed"))


def main() -> None:
    import fire

    if uses_deepspeed(sys.argv[1]):
        gloo_by_default()
    else:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # change 1
        fsdp_on_cpu()
    mesh_on_cpu()
    from axolotl.cli.train import do_cli

    fire.Fire(do_cli)


if __name__ == "__main__":
    main()
