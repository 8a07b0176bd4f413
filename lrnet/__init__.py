"""lrnet: low-rank (truncated SVD) compression of JAX/Haiku networks.

The front door: any Haiku network's factorized twin and straight-through student
(`factorized`, `straight_through`, `tracker_state`); parameter-tree compression (`compress`,
`project`, `summarize`, `decompose`, `count_params`); truncation and factors (`truncate`,
`factorize`, `st_truncate`; `lrnet.tracker` for the tracked projection); the origin notebooks'
networks in `lrnet.models`; rank estimation (`estimate_rank` of a black-box map,
`layer_spectra` of trained weights); data-aware truncation and budgets (`calibrate`,
`Calibration`, `allocate_ranks`); training objectives in `lrnet.losses` and devices in
`lrnet.parallel`; and `limit_lapack_threads` (call it before training
straight-through students on a CPU).
"""

from lrnet import models
from lrnet import tracker
from lrnet.allocation import allocate_ranks
from lrnet.calibration import calibrate
from lrnet.calibration import Calibration
from lrnet.compression import compress
from lrnet.compression import decompose
from lrnet.compression import compression_ratio
from lrnet.compression import count_params
from lrnet.compression import format_summary
from lrnet.compression import LayerSummary
from lrnet.compression import project
from lrnet.compression import select_ranks
from lrnet.compression import summarize
from lrnet.projection import st_factored_matmul
from lrnet.projection import st_truncate
from lrnet.projection import st_truncate_masked
from lrnet.rank_estimation import estimate_rank
from lrnet.rank_estimation import layer_spectra
from lrnet.runtime import limit_lapack_threads
from lrnet.students import factorized
from lrnet.students import inspect_network
from lrnet.students import straight_through
from lrnet.students import tracker_state
from lrnet.svd import check_rank
from lrnet.svd import energy_rank
from lrnet.svd import factorize
from lrnet.svd import resolve_rank
from lrnet.svd import truncate
from lrnet.svd import truncate_masked

__version__ = "0.1.0"
