"""Which runs are one experiment: the run identity (``config.json``'s ``identity``) but for
the seed.

Two runs belong to one group (one table row, one figure series, one side of a paired
comparison) when their identities are equal once the keys that are not experiment settings
are removed (:func:`splitting_identity`):

- ``seed``: the group gathers the seeds;
- ``device_type`` and ``deterministic``: recorded, not splitting. The same settings on a CPU
  and on a GPU, or with and without ``--deterministic``, are the same experiment measured
  with other kernels; analysis notes a group that mixes them (docs/reference.md §3);
- input-file digests: a key ending in ``_digest``, a ``digests`` sub-dict or a ``blake2b``
  entry (``identity['inputs']``), at any depth.
  The path (or name) of a file is a setting; its digest says which bytes were read and stays
  in ``config.json`` for anyone who wants to check.

Everything else splits: method options, the resolved protocol (``--set``), the pretrained
source, the number of tasks, the data options (``--bench-opt``), the NWS search path
(``policy_search``), any key a later version adds.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

NOT_SPLITTING = frozenset({"seed", "device_type", "deterministic"})
DIGESTS = "digests"


def _is_digest(key: str) -> bool:
    return key in (DIGESTS, "blake2b") or key.endswith("_digest")


def _strip_digests(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_digests(v) for k, v in value.items() if not _is_digest(str(k))}
    return value


def splitting_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` without the keys that do not split a group (module doc)."""
    return _strip_digests({k: v for k, v in identity.items() if k not in NOT_SPLITTING})


def flatten(identity: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``{"options": {"beta": 1}}`` -> ``{"options.beta": 1}``);
    lists and other values as they are. An empty dict is left out."""
    out: dict[str, Any] = {}
    for key, value in identity.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def group_key(identity: dict[str, Any]) -> str:
    """A short, stable digest of the splitting identity: equal for runs of one group."""
    text = json.dumps(splitting_identity(identity), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
