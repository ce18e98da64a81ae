"""Rank functions for tests/test_lightning.py: ``examples/lightning_ddp.py`` on the pool's gloo ranks.

Each pool worker already belongs to a gloo process group; with ``LOCAL_RANK``/``WORLD_SIZE`` set,
Lightning takes the processes as launched from outside (as under ``torchrun``) and uses that group.
Lightning is imported here only inside the functions, so the test process never imports it.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str) -> Any:
    """Import ``examples/<name>.py`` as a module (once per process)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def launched_as(rank: int, world_size: int) -> Any:
    """The environment ``torchrun`` would give this rank, for the duration of the block."""
    env = {
        "LOCAL_RANK": str(rank),
        "NODE_RANK": "0",
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",  # not used: the process group exists already
    }
    return mock.patch.dict(os.environ, env)


def _numpy(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().numpy().copy()
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    return tree


def initial(rank: int, world_size: int, sync: str, samples: int) -> dict[str, Any]:
    """The example's initial parameters and training set (inputs of the float64 reference)."""
    module = example("lightning_ddp")
    torch.manual_seed(0)
    net = module.Net(sync=sync)
    x, y = module.dataset(samples).tensors
    return {"params": [p.detach().numpy().copy() for p in net.parameters()], "x": x.numpy(), "y": y.numpy()}


def fit(rank: int, world_size: int, argv: list[str]) -> dict[str, Any]:
    """Run the example's ``main(argv)`` on this rank; its final parameters and regularizer state."""
    with launched_as(rank, world_size):
        model = example("lightning_ddp").main(argv)
    state = model.actreg.state_dict()
    copy = pickle.loads(pickle.dumps(model))  # what ddp_spawn / deepcopy do to the module
    copy_before = copy._actreg
    copy.setup("fit")  # builds its own regularizer and loads the carried state
    return {
        "params": [p.detach().numpy().copy() for p in model.parameters()],
        "state": _numpy(state),
        "copy_built_before_setup": copy_before is not None,
        "copy_state": _numpy(copy.actreg.state_dict()),
    }


def fit_without_penalty(rank: int, world_size: int, out: str) -> None:
    """A training_step that forgets ``self.actreg_loss()``: the mixin raises after that step."""
    module = example("lightning_ddp")

    class Forgetful(module.Net):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

    import lightning as L

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(module.dataset(32), batch_size=8)
    with launched_as(rank, world_size):
        trainer = L.Trainer(
            accelerator="cpu", devices=world_size, strategy="ddp", max_steps=2, default_root_dir=out,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(Forgetful(), loader)
