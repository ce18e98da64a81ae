"""The smallest complete use of actreg: DDP training with exact global-batch penalties.

    torchrun --nproc-per-node 2 examples/minimal_ddp.py

(or plain ``python examples/minimal_ddp.py`` for one process). Each rank sees its own shard; the
penalties are those of the global batch, and one all_reduce per step carries all of them.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import actreg


def main() -> None:
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    net = DDP(model) if distributed else model
    reg = actreg.ActivityRegularizer(
        net,
        {"1": actreg.L1(1e-3), "3": [actreg.VarianceFloor(1.0), actreg.Covariance(0.04)]},
        sync="global",
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    for step in range(50):
        x = torch.randn(64, 16, generator=data)  # the global batch ...
        y = (x[:, :4].argmax(1) + (x[:, 4] > 0)) % 4
        shard = slice(rank * 64 // world, (rank + 1) * 64 // world)  # ... and this rank's part
        loss = nn.functional.cross_entropy(net(x[shard]), y[shard]) + reg.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step % 10 == 0:
            m = reg.metrics()
            print(
                f"step {step:2d}  loss {loss.item():.4f}  penalty {m['total']:.4f}  "
                f"active fraction of layer 1: {m['1/active_fraction']:.2f}"
            )
    reg.check()  # errors of the last step are raised by the next call: make that call
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
