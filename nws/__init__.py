"""Neural Weight Search as a library (see README).

    model = nws.nwsify(model, pools=nws.kmeans_pools(model))   # convs + last Linear
    loss = ce + nws.similarity_loss(model, beta=0.5)           # W pulled to its kernels
    indices = nws.encode(model)                                # the task model
    plain = nws.decode_into(plain_model, pools, indices)       # inference: plain convs
"""

from nws.codec import empirical_entropy_bits
from nws.convert import (
    Indices,
    Pools,
    convertible_layers,
    decode_into,
    distillation_loss,
    encode,
    get_pools,
    lookup,
    nws_layers,
    nwsify,
    random_pools,
    set_search_path,
    similarity_loss,
    to_plain,
)
from nws.ema import ema_update, enable_ema
from nws.kmeans import kmeans, kmeans_pools
from nws.layer import NWSConv2d, NWSLayer, NWSLinear, SearchGroup
from nws.pools_io import (
    PoolsFile,
    import_authors_pools,
    load_pools,
    pools_file_from_model,
    save_pools,
)
from nws.search import (
    Certificates,
    FullSearch,
    ScalarLookup,
    Searcher,
    ieee_fp32_matmul,
    nearest,
    nearest_index,
    search_path,
    searcher_for,
)

__all__ = [
    "Certificates", "FullSearch", "Indices", "NWSConv2d", "NWSLayer", "NWSLinear", "Pools",
    "PoolsFile", "ScalarLookup", "SearchGroup", "Searcher",
    "convertible_layers", "decode_into", "distillation_loss", "ema_update",
    "empirical_entropy_bits", "enable_ema", "encode", "get_pools", "ieee_fp32_matmul",
    "import_authors_pools",
    "kmeans", "kmeans_pools", "load_pools", "lookup", "nearest", "nearest_index",
    "nws_layers", "nwsify", "pools_file_from_model", "random_pools", "save_pools",
    "search_path", "searcher_for", "set_search_path", "similarity_loss", "to_plain",
]
