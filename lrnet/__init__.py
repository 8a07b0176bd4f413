"""lrnet: low-rank (truncated SVD) compression of JAX/Haiku networks.

A tour: `compress(params, rank)` factorizes each layer's weight W into u @ v, `project` keeps
W's shape at rank r, `summarize` counts what it saves (`decompose` shares the SVDs); any Haiku
network's `factorized` twin runs the factors and its `straight_through` student (with
`tracker_state`) trains dense weights through the rank-r projection; `calibrate` whitens the
truncation with a layer's inputs and `allocate_ranks` picks per-layer ranks within a budget;
`truncate` / `factorize` / `st_truncate` act on one matrix; `estimate_rank` finds the rank
hidden in a black-box map and `layer_spectra` reads a trained network's. Networks are in
`models`, objectives in `losses`; on a CPU call `limit_lapack_threads()` before training.

>>> import jax, jax.numpy as jnp, lrnet
>>> net = lrnet.models.mlp((64,), 10)
>>> params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))
>>> compressed = lrnet.compress(params, rank=8)   # the output layer stays dense
>>> compressed["linear_0"]["u"].shape, compressed["linear_0"]["v"].shape
((784, 8), (8, 64))
>>> lrnet.count_params(params), lrnet.count_params(compressed)
(50890, 7498)
"""

from lrnet import losses
from lrnet import models
from lrnet import tracker
from lrnet.allocation import allocate_ranks
from lrnet.calibration import calibrate
from lrnet.compression import compress
from lrnet.compression import count_params
from lrnet.compression import decompose
from lrnet.compression import project
from lrnet.compression import summarize
from lrnet.projection import st_truncate
from lrnet.rank_estimation import estimate_rank
from lrnet.runtime import limit_lapack_threads
from lrnet.spectra import layer_spectra
from lrnet.students import factorized
from lrnet.students import straight_through
from lrnet.students import tracker_state
from lrnet.svd import factorize
from lrnet.svd import truncate

__all__ = [
    "allocate_ranks", "calibrate", "compress", "count_params", "decompose", "estimate_rank",
    "factorize", "factorized", "layer_spectra", "limit_lapack_threads", "losses", "models",
    "project", "st_truncate", "straight_through", "summarize", "tracker", "tracker_state",
    "truncate",
]
__version__ = "0.1.0"
