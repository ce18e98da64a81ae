"""The ``actreg`` command's demo: distributed training on scikit-learn's digits, comparison, checks.

Modules:

* :mod:`actreg.demo.config` -- settings (dataclass, TOML, ``--penalty`` specs);
* :mod:`actreg.demo.data` -- the digits data and deterministic, uneven sharding;
* :mod:`actreg.demo.model` -- the demo MLP, its default penalties and a ``verify`` factory;
* :mod:`actreg.demo.train` -- the per-rank worker (``torchrun ... -m actreg.demo.train``);
* :mod:`actreg.demo.compare` -- no penalty vs ``local`` / ``global`` / ``ema`` side by side;
* :mod:`actreg.demo.verify` -- 1 rank vs W ranks gradient check of a user's model;
* :mod:`actreg.demo.launch` -- W local workers through ``torch.distributed``'s elastic launcher;
* :mod:`actreg.demo.report` -- ``metrics.jsonl``, ``report.md`` and PNG plots;
* ``actreg.demo.moe_*`` -- ``actreg moe``: a small MoE byte language model on four text domains,
  per-micro-batch vs global-batch balance (``moe_config``, ``moe_data``, ``moe_lm``,
  ``moe_variants``, ``moe_train``, ``moe_run``, ``moe_metrics``, ``moe_report``).

Optional dependencies (``pip install 'actreg[demo]'``): scikit-learn, matplotlib, rich.
"""
