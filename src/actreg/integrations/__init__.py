"""Framework integrations, each an optional extra imported on its own.

- :mod:`actreg.integrations.lightning` (``pip install "actreg[lightning]"``): ``ActivityRegularized``,
  a ``LightningModule`` mixin that builds the regularizer in ``setup``, logs ``reg.metrics()``
  through ``self.log`` and keeps the regularizer state in Lightning checkpoints.
- :mod:`actreg.integrations.hf` (``pip install "actreg[hf]"``): Hugging Face MoE models (Mixtral
  style): the load balance of the global batch in place of the per-rank auxiliary loss.

``import actreg`` imports neither module, and neither module imports its framework: they only
use what the framework passes them, so they work with ``lightning`` and ``pytorch_lightning`` alike.
"""
