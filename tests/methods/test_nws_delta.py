"""NWS's delta codec in the artifact store: chains decode to the indices learned, key frames
cut them, the decoded-task cache decodes each task once, and a truncated chain says which
task is missing. A tiny NWS model stands in for training (no learning is needed here)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import nws
from benchmarks.core.protocols import resolve_protocol
from benchmarks.core.store import ArtifactStore
from benchmarks.methods import nws_method
from benchmarks.methods.contract import MethodContext, TaskInfo
from benchmarks.methods.nws_method import BrokenChainError, NWSMethod
from benchmarks.models.archs import Pretrained
from nws import codec

POOL, TASKS = 16, 7


def _model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 32, 3, bias=False), nn.BatchNorm2d(32),
                          nn.Conv2d(32, 64, 3, bias=False), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, 4, bias=False))
    return nws.nwsify(model, POOL, generator=torch.Generator().manual_seed(0))


def _method(**options) -> NWSMethod:
    tasks = tuple(TaskInfo(t, f"t{t}", 4) for t in range(TASKS))
    opts = NWSMethod.resolve_options("split_digits", {"pool_size": POOL, **options})
    return NWSMethod(MethodContext("resnet18", "split_digits", tasks,
                                   resolve_protocol("quick", "split_digits"),
                                   torch.device("cpu"), 1993, Pretrained("resnet18", "none"),
                                   opts))


def _learned() -> list[dict[str, np.ndarray]]:
    """Index chains: each task the one before with ~10% of its indices redrawn."""
    rng = np.random.default_rng(0)
    layers = nws.nws_layers(_model())
    tasks = [{k: rng.integers(0, POOL, m.num_groups) for k, m in layers.items()}]
    for _ in range(1, TASKS):
        nxt = {}
        for k, a in tasks[-1].items():
            a = a.copy()
            where = rng.random(len(a)) < 0.1
            a[where] = rng.integers(0, POOL, int(where.sum()))
            nxt[k] = a
        tasks.append(nxt)
    return tasks


def _store(tmp_path, name: str, learned, **options) -> ArtifactStore:
    method, model = _method(**options), _model()
    store = ArtifactStore(tmp_path / name)
    for t, indices in enumerate(learned):
        for k, layer in nws.nws_layers(model).items():
            layer.start_from(torch.from_numpy(indices[k]))
        with store.transaction() as tx:
            method.save_task(method.ctx.tasks[t], model, tx)
    return store


@pytest.fixture(scope="module")
def learned():
    return _learned()


@pytest.mark.parametrize("keyframes", [None, 3])
def test_chain_decodes_to_the_directly_stored_indices(tmp_path, learned, keyframes) -> None:
    direct = _store(tmp_path, "fixed", learned)
    delta = _store(tmp_path, "delta", learned, codec="delta", keyframe_every=keyframes)
    nws_method._decoded.clear()
    expected = ["nws-fixed" if t == 0 or (keyframes and t % keyframes == 0) else "nws-delta"
                for t in range(TASKS)]
    assert [delta.info("indices", t).codec for t in range(TASKS)] == expected
    for t in reversed(range(TASKS)):  # from the end: each read walks its whole chain
        got, want = NWSMethod.task_indices(delta, t), NWSMethod.task_indices(direct, t)
        assert list(got) == list(want) == list(learned[t])
        assert all(np.array_equal(got[k], learned[t][k]) for k in got)
        stored = delta.info("indices", t).nbytes
        if expected[t] == "nws-fixed":
            assert stored == direct.info("indices", t).nbytes
        else:  # 10% changed of 16 entries: mask ~0.47 + values ~0.4 bits against 4 fixed
            assert stored < 0.35 * direct.info("indices", t).nbytes
    # BN, pools: the same bytes whatever the codec
    for t in range(TASKS):
        assert delta.get_bytes("bn", t) == direct.get_bytes("bn", t)
    assert delta.get_bytes("pools") == direct.get_bytes("pools")


def test_reading_tasks_in_order_decodes_each_task_once(tmp_path, learned, monkeypatch) -> None:
    store = _store(tmp_path, "delta", learned, codec="delta")
    nws_method._decoded.clear()
    calls = []
    real = codec.decode_delta
    monkeypatch.setattr(codec, "decode_delta", lambda *a: calls.append(1) or real(*a))
    for last in range(TASKS):  # the harness's evaluation after each task: tasks 0..last
        for t in range(last + 1):
            NWSMethod.task_indices(store, t)
    assert len(calls) == TASKS - 1


def test_metrics_report_the_change_and_the_bound(tmp_path, learned) -> None:
    store = _store(tmp_path, "delta", learned, codec="delta")
    method = _method(codec="delta")
    assert "changed_fraction" not in method.task_metrics(method.ctx.tasks[0], store)
    m = method.task_metrics(method.ctx.tasks[2], store)
    count = sum(len(a) for a in learned[2].values())
    changed = sum(int((learned[2][k] != learned[1][k]).sum()) for k in learned[2])
    assert m["changed_fraction"] == changed / count
    assert m["bits_per_index"] == m["bits_per_index_delta"] == pytest.approx(
        8 * store.info("indices", 2).nbytes / count)
    assert m["delta_entropy_bits"] <= m["bits_per_index"] < m["bits_per_index_fixed"] == 4


def test_truncated_chain_names_the_missing_task(tmp_path, learned) -> None:
    store = _store(tmp_path, "delta", learned, codec="delta")
    index = json.loads((store.root / "index.json").read_text())
    lost = store.root / index["task_004"]["indices"]["file"]
    del index["task_004"]
    (store.root / "index.json").write_text(json.dumps(index))
    truncated = ArtifactStore(store.root, readonly=True)
    nws_method._decoded.clear()
    assert np.array_equal(NWSMethod.task_indices(truncated, 3)["0"], learned[3]["0"])
    with pytest.raises(BrokenChainError, match="needs task 4's indices") as err:
        NWSMethod.task_indices(truncated, 6)
    assert "task 6" in str(err.value) and str(store.root) in str(err.value)
    # the index names the blob but its file is gone
    other = _store(tmp_path, "other", learned, codec="delta")
    (other.root / other.info("indices", 2).file).unlink()
    nws_method._decoded.clear()
    with pytest.raises(BrokenChainError, match=r"needs task 2's indices.*missing"):
        NWSMethod.task_indices(other, 5)
    assert lost.exists()


def test_a_flipped_byte_mid_chain_is_an_error_not_new_indices(tmp_path, learned) -> None:
    """Was: one flipped byte of a delta blob changed thousands of later tasks' indices and
    the re-evaluation exited 0; the blob's checksum in the store's index finds it."""
    store = _store(tmp_path, "flip", learned, codec="delta")
    path = store.root / store.info("indices", 2).file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    nws_method._decoded.clear()
    flipped = ArtifactStore(store.root, readonly=True)
    assert np.array_equal(NWSMethod.task_indices(flipped, 1)["0"], learned[1]["0"])
    with pytest.raises(BrokenChainError, match=r"needs task 2's indices.*checksum") as err:
        NWSMethod.task_indices(flipped, 5)
    assert str(path) in str(err.value)


def test_bad_options_and_the_formula_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="keyframe_every"):
        _method(codec="delta", keyframe_every=-2)
    with pytest.raises(ValueError, match="codec"):
        _method(codec="zip")
    assert _method(codec="delta", keyframe_every="none").keyframe_every is None
    with pytest.raises(ValueError, match="use store bytes"):
        NWSMethod.memory_formula("resnet18", [2, 2], NWSMethod.resolve_options(
            "split_digits", {"codec": "delta"}))
    assert math.isfinite(NWSMethod.memory_formula("resnet18", [2], {}).total())


@pytest.mark.slow
def test_a_run_killed_after_a_delta_task_resumes_from_the_chain(tmp_path, monkeypatch) -> None:
    """Killed while learning task 2: the resumed run starts task 2 from task 1 decoded from
    the chain (no in-process cache) and ends bit-identical to an uninterrupted run."""
    from benchmarks.core.results import load_rows
    from benchmarks.engine import training
    from benchmarks.engine.harness import RunConfig, run

    def config(out) -> RunConfig:
        return RunConfig(method="nws", benchmark="synthetic", protocol="smoke", out=str(out),
                         progress=False, num_tasks=3, deterministic=True,
                         benchmark_options={"n_train": 8, "n_test": 4, "size": 16},
                         method_options={"codec": "delta", "pool_size": 16,
                                         "kmeans_points": 1024, "kmeans_iters": 1})

    def blobs(folder) -> dict:
        store = ArtifactStore(folder / "artifacts")
        return {(t, n): store.get_bytes(n, t) for t in store.tasks() for n in store.names(t)}

    whole = run(config(tmp_path / "whole"))
    rows = load_rows(whole)
    steps = rows[rows.metric == "train_steps"].sort_values("task").value.astype(int).tolist()
    step, calls = training.Trainer.step, [0]

    def counted(self, x, y):
        calls[0] += 1
        if calls[0] > steps[0] + steps[1]:
            raise KeyboardInterrupt  # killed inside task 2
        return step(self, x, y)

    monkeypatch.setattr(training.Trainer, "step", counted)
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path / "resumed"))
    monkeypatch.setattr(training.Trainer, "step", step)
    resumed = next((tmp_path / "resumed").iterdir())
    assert ArtifactStore(resumed / "artifacts").tasks() == [0, 1]
    nws_method._decoded.clear()
    run(config(tmp_path / "resumed"))
    assert blobs(whole) == blobs(resumed)
    assert ArtifactStore(resumed / "artifacts").info("indices", 2).codec == "nws-delta"
