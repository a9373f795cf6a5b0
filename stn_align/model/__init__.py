"""The siamese spatial-transformer aligner, one part a file (RAFT / IHN style).

* :mod:`.encoder`     -- the shared (siamese) feature extractor, features at 1/4 and 1/8 of the working size;
* :mod:`.correlation` -- the global correlation (coarse stage) and the all-pairs pyramid with local lookups (fine stage);
* :mod:`.update`      -- the localisation heads: the global regression head and the iterative update block;
* :mod:`.network`     -- :class:`ModelConfig` and :class:`AlignerNet`, which ties them to the grid generator and
  sampler of :mod:`stn_align.geometry`.
"""

from .correlation import CorrelationPyramid, global_correlation
from .encoder import Encoder, standardize
from .network import ARCHITECTURES, AlignerNet, ModelConfig, parameter_count, resolve_device
from .update import RegressionHead, UpdateBlock

__all__ = ["ARCHITECTURES", "AlignerNet", "CorrelationPyramid", "Encoder", "ModelConfig", "RegressionHead",
           "UpdateBlock", "global_correlation", "parameter_count", "resolve_device", "standardize"]
