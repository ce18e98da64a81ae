"""PyTorch Lightning: ``ActivityRegularized``, a mixin for a ``LightningModule``.

A Lightning ``Callback`` cannot add to the loss that ``training_step`` returns, so the penalty is
added where the loss is made, and the mixin does everything else::

    import actreg
    from actreg.integrations.lightning import ActivityRegularized

    class Net(ActivityRegularized, L.LightningModule):      # the mixin first
        def configure_actreg(self) -> actreg.ActivityRegularizer:
            return actreg.ActivityRegularizer(self, {"body.1": actreg.L1(1e-3)}, sync="ema")

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y) + self.actreg_loss()

The mixin

- builds the regularizer in ``setup("fit")`` (on every rank, after Lightning has initialised the
  process group, so ``sync="global"``/``"ema"`` reduce over the default group), through
  ``configure_actreg`` -- like ``configure_optimizers``, it returns the object;
- logs ``reg.metrics()`` through ``self.log_dict`` as ``"actreg/<key>"``, at the trainer's
  ``log_every_n_steps`` cadence (metrics read the device, so only when Lightning logs);
- keeps ``reg.state_dict()`` (the EMA) under ``checkpoint["actreg"]`` and restores it on resume
  (``trainer.fit(..., ckpt_path=...)``) and in ``load_from_checkpoint`` (applied when the
  regularizer is built);
- raises after a training step whose ``training_step`` did not call ``self.actreg_loss()``
  (statistics would otherwise pile up from step to step);
- in ``teardown("fit")`` removes the hooks and calls ``reg.check()`` (the last step's errors are
  raised); ``self.actreg`` still gives the last metrics and state, and a later fit continues it.

A module that overrides ``setup``, ``teardown``, ``on_train_batch_start``, ``on_train_batch_end``,
``on_save_checkpoint`` or ``on_load_checkpoint`` must call ``super()`` in it. The module imports
nothing from Lightning: it works with ``lightning`` and ``pytorch_lightning`` alike.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..regularizer import ActivityRegularizer

CHECKPOINT_KEY = "actreg"


class ActivityRegularized:
    """Mixin for a ``LightningModule``: one ``ActivityRegularizer`` per fit, logged and checkpointed.

    Put it before ``LightningModule`` in the bases, override :meth:`configure_actreg` and add
    :meth:`actreg_loss` to the loss of ``training_step``.
    """

    #: prefix of the logged metric names
    actreg_log_prefix: str = "actreg/"

    _actreg: ActivityRegularizer | None = None
    _actreg_done = False  # the fit that built _actreg has ended (its hooks are removed)
    _actreg_pending: Mapping[str, Any] | None = None  # a loaded state waiting for the regularizer
    _actreg_calls: int = 0  # actreg_loss() calls in the current training batch

    def configure_actreg(self) -> ActivityRegularizer:
        """Return the regularizer of this module; called once, in ``setup("fit")``, on every rank."""
        raise NotImplementedError(
            f"{type(self).__name__} mixes in ActivityRegularized but does not override "
            "configure_actreg(); return actreg.ActivityRegularizer(self, {glob: penalty}, ...) from it"
        )

    @property
    def actreg(self) -> ActivityRegularizer:
        """The regularizer built by :meth:`configure_actreg` (for its ``metrics()``, ``state_dict()``)."""
        if self._actreg is None:
            raise RuntimeError(
                f"{type(self).__name__}.actreg is built in setup('fit'): call it inside trainer.fit(...) "
                "(training_step and later hooks), or call setup('fit') yourself outside a Trainer"
            )
        return self._actreg

    def actreg_loss(self) -> Tensor:
        """The penalty of this step's recordings (``reg.loss()``): add it to the training loss."""
        reg = self.actreg
        self._actreg_calls += 1
        return reg.loss()

    def setup(self, stage: str) -> None:
        super().setup(stage)  # type: ignore[misc]
        if stage == "fit" and (self._actreg is None or self._actreg_done):
            reg = self.configure_actreg()
            if not isinstance(reg, ActivityRegularizer):
                raise TypeError(
                    f"{type(self).__name__}.configure_actreg() must return an actreg.ActivityRegularizer, "
                    f"got {type(reg).__name__}"
                )
            if self._actreg_pending is not None:
                reg.load_state_dict(self._actreg_pending)
                self._actreg_pending = None
            self._actreg, self._actreg_done = reg, False

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        self._actreg_calls = 0
        return super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # type: ignore[misc]
        if self._actreg is None or self._actreg_done:
            return
        if self._actreg_calls == 0:
            raise RuntimeError(
                f"rank {self.global_rank}: training_step of batch {batch_idx} did not call "  # type: ignore[attr-defined]
                "self.actreg_loss(); add it to the loss it returns (`return task_loss + "
                "self.actreg_loss()`), or the recorded statistics pile up into the next step"
            )
        if self._actreg_should_log():
            metrics = self._actreg.metrics()
            prefix = self.actreg_log_prefix
            self.log_dict(  # type: ignore[attr-defined]
                {prefix + key: value for key, value in metrics.items()}, on_step=True, on_epoch=False
            )

    def _actreg_should_log(self) -> bool:
        """Whether Lightning writes this step's logs (its ``log_every_n_steps`` cadence)."""
        connector = getattr(self.trainer, "_logger_connector", None)  # type: ignore[attr-defined]
        return bool(getattr(connector, "should_update_logs", True))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        if self._actreg is not None and not self._actreg_done:
            checkpoint[CHECKPOINT_KEY] = self._actreg.state_dict()
        elif self._actreg_pending is not None:
            checkpoint[CHECKPOINT_KEY] = self._actreg_pending

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            warnings.warn(
                f"{type(self).__name__}: the checkpoint has no {CHECKPOINT_KEY!r} entry (saved without "
                "ActivityRegularized?): the regularizer starts from a fresh state",
                stacklevel=2,
            )
        elif self._actreg is not None and not self._actreg_done:
            self._actreg.load_state_dict(state)
        else:
            self._actreg_pending = state  # applied when setup('fit') builds the regularizer

    def teardown(self, stage: str) -> None:
        """End of the fit: remove the hooks, raise what the last step decided, keep the state.

        ``self.actreg`` still answers ``metrics()`` and ``state_dict()``; a later ``trainer.fit``
        builds a new regularizer that continues from this state.
        """
        super().teardown(stage)  # type: ignore[misc]
        if stage == "fit" and self._actreg is not None and not self._actreg_done:
            reg = self._actreg
            reg.remove()  # nothing records outside a fit (no statistics pile up unread)
            self._actreg_done = True
            reg.check()
            self._actreg_pending = reg.state_dict()

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (``ddp_spawn``, ``copy.deepcopy``) outside a fit carries the regularizer's state.

        The copy builds its own regularizer in ``setup('fit')`` and loads that state. (Inside a fit
        the hooks, closures on the submodules, cannot be pickled.)
        """
        state: dict[str, Any] = dict(super().__getstate__())  # type: ignore[misc]
        state.pop("_actreg", None)
        state.pop("_actreg_done", None)
        return state
