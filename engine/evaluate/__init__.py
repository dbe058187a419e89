"""FID and KID of generated images against a reference set, with the FID Inception network.

One concept per module: `feature_network` (the Inception TorchScript file, loaded and run), `reference`
(reference statistics: computed, saved, read, checked), `fid` (FID and KID, under torch.distributed as
well), `cli` (`python -m engine.evaluate`, see its docstring), `errors`. The public names are re-exported
here.
"""

from engine.evaluate.cli import main, parse_args
from engine.evaluate.errors import EvaluationError
from engine.evaluate.feature_network import (DEFAULT_BATCH_SIZE, DEFAULT_INCEPTION, INCEPTION_ENV, INCEPTION_URL,
                                             FeatureNetwork, inception_path, load_feature_network)
from engine.distributed import rank_slice
from engine.evaluate.fid import DEFAULT_KID_SUBSET_SIZE, DEFAULT_KID_SUBSETS, evaluate, summary
from engine.evaluate.reference import (DEFAULT_MAX_FEATURES, STATS_FORMAT, ReferenceStats, check_reference,
                                       load_reference, read_reference, reference_statistics, save_reference)

__all__ = [
    "DEFAULT_BATCH_SIZE", "DEFAULT_INCEPTION", "DEFAULT_KID_SUBSETS", "DEFAULT_KID_SUBSET_SIZE",
    "DEFAULT_MAX_FEATURES", "INCEPTION_ENV", "INCEPTION_URL", "STATS_FORMAT", "EvaluationError", "FeatureNetwork",
    "ReferenceStats", "check_reference", "evaluate", "inception_path", "load_feature_network", "load_reference",
    "main", "parse_args", "rank_slice", "read_reference", "reference_statistics", "save_reference", "summary",
]
