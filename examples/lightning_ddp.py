"""PyTorch Lightning with actreg: penalties of the global batch under DDP, logged and checkpointed.

    pip install "actreg[lightning]"
    python examples/lightning_ddp.py                       # 2 CPU ranks (Lightning starts the second)
    python examples/lightning_ddp.py --epochs 4 --resume runs/lightning/checkpoints/epoch=1.ckpt

The module mixes in ``actreg.integrations.lightning.ActivityRegularized``: it returns its
regularizer from ``configure_actreg`` and adds ``self.actreg_loss()`` to the loss. The mixin logs
``reg.metrics()`` (``actreg/...`` columns of ``<out>/lightning_logs/version_*/metrics.csv``) and
keeps the moving average of ``sync="ema"`` in every checkpoint, so a resumed run continues it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import actreg
from actreg.integrations.lightning import ActivityRegularized


class Net(ActivityRegularized, L.LightningModule):
    """An MLP with L1 on its first hidden layer and a VICReg variance floor on its second."""

    def __init__(self, sync: str = "ema", lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(
            nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4)
        )

    def configure_actreg(self) -> actreg.ActivityRegularizer:
        return actreg.ActivityRegularizer(
            self,
            {"body.1": actreg.L1(1e-2), "body.3": actreg.VarianceFloor(0.1, gamma=0.5)},
            sync=self.hparams.sync,
            decay=0.9,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        task = F.cross_entropy(self(x), y)
        self.log("task_loss", task)
        return task + self.actreg_loss()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def dataset(samples: int) -> TensorDataset:
    """A fixed synthetic 4-class problem (the same on every rank; Lightning shards it)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 16, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 0)) % 4
    return TensorDataset(x, y)


def main(argv: Sequence[str] | None = None) -> Net:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/lightning", help="logs and checkpoints go here")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=512, help="size of the synthetic training set")
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--devices", type=int, default=2, help="CPU ranks")
    p.add_argument("--sync", default="ema", choices=["local", "global", "ema"])
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--resume", default=None, help="a checkpoint to continue from")
    args = p.parse_args(argv)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = Net(sync=args.sync, lr=args.lr)
    # shuffle=False: Lightning's DistributedSampler gives rank r the samples r, r + W, r + 2W, ...
    loader = DataLoader(dataset(args.samples), batch_size=args.batch_size, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        default_root_dir=args.out,
        logger=CSVLogger(args.out),
        callbacks=[
            ModelCheckpoint(dirpath=f"{args.out}/checkpoints", filename="{epoch}", save_top_k=-1)
        ],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader, ckpt_path=args.resume)
    if trainer.is_global_zero:
        m = model.actreg.metrics()
        print(f"done: {trainer.global_step} steps, penalty {m['total']:.4f}, "
              f"body.1 active fraction {m['body.1/active_fraction']:.2f}")
    return model


if __name__ == "__main__":
    main()
