"""actreg: exact activity regularization for data-parallel PyTorch training.

reg = actreg.ActivityRegularizer(model, {"encoder.*": actreg.L1(1e-4)}, sync="global")
loss = task_loss + reg.loss()      # one all_reduce for all layers; none in backward
"""

from .errors import ActregError, LayoutMismatchError, NonFiniteStatisticError, RecordingError
from .penalties import (
    AR,
    BATCH_COUNT,
    L1,
    L2,
    TAR,
    Covariance,
    DeCov,
    ExpertBias,
    KLSparsity,
    LoadBalance,
    SequenceBalance,
    VarianceFloor,
    ZLoss,
    count_of,
    nonzero,
)
from .penalty import Penalty
from .positions import positions
from .regularizer import ActivityRegularizer
from .weights import WeightL1, WeightL2, WeightPenalty

__version__ = "0.1.0"

__all__ = [
    "AR",
    "BATCH_COUNT",
    "L1",
    "L2",
    "TAR",
    "ActivityRegularizer",
    "ActregError",
    "Covariance",
    "DeCov",
    "ExpertBias",
    "KLSparsity",
    "LayoutMismatchError",
    "LoadBalance",
    "NonFiniteStatisticError",
    "Penalty",
    "RecordingError",
    "SequenceBalance",
    "VarianceFloor",
    "WeightL1",
    "WeightL2",
    "WeightPenalty",
    "ZLoss",
    "__version__",
    "count_of",
    "nonzero",
    "positions",
]
