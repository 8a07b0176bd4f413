"""lrnet: low-rank (truncated SVD) compression of JAX/Haiku networks.

The front door: truncation and factors (`truncate`, `factorize`), the straight-through
projection (`st_truncate`, and `lrnet.tracker` for the fast tracked one), parameter-tree
compression (`compress`, `project`, `summarize`, `count_params`), the networks in
`lrnet.models`, and `limit_lapack_threads` (call it before training straight-through
students on a CPU).
"""

from lrnet import models
from lrnet import tracker
from lrnet.compression import compress
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
from lrnet.runtime import limit_lapack_threads
from lrnet.svd import check_rank
from lrnet.svd import energy_rank
from lrnet.svd import factorize
from lrnet.svd import resolve_rank
from lrnet.svd import truncate
from lrnet.svd import truncate_masked

__version__ = "0.1.0"
