"""Fetch and build everything a sweep needs before its jobs start (e.g. on a login node with
internet but no GPU, for compute nodes without internet).

    python -m benchmarks.prefetch --method all --benchmark split_cifar100 --protocol paper \\
        --data-root ~/data [--kernels-dir DIR]                    # the sweep's own flags

For the planned runs it (1) opens the benchmark through its own loader (downloading what that
loader can download, e.g. CIFAR-100; checking the folder trees otherwise), (2) loads the
starting weights (ImageNet weights through torchvision's weights API into torch's hub cache,
``$TORCH_HOME/hub/checkpoints``; a ``--weights`` file is read once), and (3) builds the NWS CPU
kernels into their cache (``--kernels-dir`` / ``$NWS_KERNELS_DIR`` / ``$TORCH_EXTENSIONS_DIR``;
use the same folder in the jobs). Launcher flags are accepted and ignored. One line per item;
exit 2 when data or weights are missing (each line says what and where), else 0. Kernels that
cannot be built are a warning: runs then use the eager search.
"""

from __future__ import annotations

import sys
import warnings

from benchmarks.data import DataUnavailableError
from benchmarks.engine.harness import build_benchmark
from benchmarks.models.archs import Pretrained, WeightsUnavailableError


def prefetch(args) -> list[tuple[str, str, str]]:
    """(status, item, detail) per item: status is ``ok``, ``missing`` or ``warning``."""
    from benchmarks.exec import run as cli

    configs = cli.run_configs(args)
    cli.apply_process_settings(configs[0])
    found: list[tuple[str, str, str]] = []
    try:
        bench = build_benchmark(configs[0])  # one benchmark, arch and data root per sweep
        sizes = ", ".join(f"{len(t.train)}/{len(t.test)}" for t in bench.tasks[:3])
        found.append(("ok", f"data {bench.name}", f"{len(bench.tasks)} tasks "
                      f"(train/test images of the first: {sizes})"))
        source = configs[0].pretrained or bench.default_pretrained
    except DataUnavailableError as err:
        found.append(("missing", f"data {configs[0].benchmark}", str(err)))
        source = configs[0].pretrained or "imagenet"
    if source == "none":
        found.append(("ok", f"weights {configs[0].arch}", "none needed (random init)"))
    else:
        try:
            _ = Pretrained(configs[0].arch, source).state_dict
            import torch

            where = f"{torch.hub.get_dir()}/checkpoints" if source == "imagenet" else source
            found.append(("ok", f"weights {configs[0].arch} {source}", where))
        except WeightsUnavailableError as err:
            found.append(("missing", f"weights {configs[0].arch} {source}", str(err)))
    from nws import cpu_kernels

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = cpu_kernels.compiled()
    if module is not None:
        found.append(("ok", "NWS CPU kernels", str(module.__file__)))
    else:
        why = "; ".join(str(w.message) for w in caught) or f"disabled ({cpu_kernels.ENV}=0)"
        found.append(("warning", "NWS CPU kernels", why))
    return found


def main(argv: list[str] | None = None) -> int:
    from benchmarks.exec import run as cli

    p = cli.parser()
    p.prog, p.description = "python -m benchmarks.prefetch", __doc__
    args = p.parse_args(argv)
    try:
        found = prefetch(args)
    except cli.CLI_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for status, item, detail in found:
        print(f"{status:<8} {item}: {detail}")
    missing = [item for status, item, _ in found if status == "missing"]
    if missing:
        print(f"error: missing: {', '.join(missing)} (see above); jobs would stop on them",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
