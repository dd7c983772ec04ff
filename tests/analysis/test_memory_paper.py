"""CI check 3: the paper convention reproduces the paper's memory (docs/reference.md §5).

Tolerances from issue 5. NWS uses the modelled index stream and AQD the modelled code stream
(i.i.d. uniform 2-bit codes, one byte per code + lzma; no runs are given here), see
analysis.memory. KSM on CUB-to-Sketches fits no rule: the report must show the paper's
figure beside a different one (the gap). PackNet follows CPG's checkpoint layout (55.46 MiB
against 55.2 and 55.68 against 56.0); it used to be the 1000-class model + 1 byte per conv
weight (55.24 on both, so CUB-to-Sketches was a "no rule" case).
"""

from __future__ import annotations

import json

import pytest

from analysis.counts import arch_counts
from analysis.memory import (
    MIB,
    QUANTISER_BUFFERS,
    _quantiser_modules,
    cpg_checkpoint_parts,
    lzma_nbytes,
    main,
    memory_report,
    pickled_nbytes,
)

TOLERANCE = {  # (benchmark, method): relative tolerance
    ("split_cifar100", "finetune"): 0.005, ("cub_to_sketches", "finetune"): 0.005,
    ("split_cifar100", "packnet"): 0.005, ("cub_to_sketches", "packnet"): 0.01,
    ("split_cifar100", "ksm"): 0.01,
    ("split_cifar100", "nws"): 0.10, ("cub_to_sketches", "nws"): 0.10,
    # AQD (issue 22): lzma of i.i.d. uniform codes at one byte per code is 2.17 bits per
    # code (measured, 11.2M codes), not the 2.00 counted before, so the modelled figures
    # rose from +6%/+15% to +14.3% (60.2 against 52.7 MiB) and +23.0% (16.8 against 13.7).
    # CUB-to-Sketches' bound is 0.25 for that measured +23.0%; the paper's trained codes
    # compressed to 1.7-1.9 bits (its 13.7 and 52.7 MiB less our float parts).
    ("split_cifar100", "aqd"): 0.20, ("cub_to_sketches", "aqd"): 0.25,
}
NO_RULE = [("cub_to_sketches", "ksm")]


@pytest.fixture(scope="module")
def reports() -> dict:
    methods = ["finetune", "packnet", "ksm", "nws", "aqd"]
    return {b: memory_report(b, "resnet18", results=None, methods=methods, stored=False)
            for b in ("split_cifar100", "cub_to_sketches")}


@pytest.mark.parametrize(("bench", "method"), sorted(TOLERANCE))
def test_paper_convention_within_tolerance(reports, bench: str, method: str) -> None:
    r = reports[bench][method].as_json()
    assert r["paper_mib"] is not None
    gap = r["paper_convention_mib"] / r["paper_mib"] - 1
    assert abs(gap) <= TOLERANCE[(bench, method)], f"{gap:+.2%}"


@pytest.mark.parametrize(("bench", "method"), NO_RULE)
def test_gap_is_shown_where_no_rule_fits(reports, bench: str, method: str) -> None:
    r = reports[bench][method].as_json()
    assert r["paper_mib"] is not None and r["paper_convention_mib"] is not None
    assert abs(r["paper_convention_mib"] / r["paper_mib"] - 1) > 0.01


def test_aqd_modelled_codes_lie_above_the_paper(reports) -> None:
    """Uniform codes are the most lzma can be given (maximum entropy); trained ones are
    skewed, so the paper's own codes compressed below the model."""
    for b in reports:
        r = reports[b]["aqd"].as_json()
        assert r["paper_convention_mib"] >= r["paper_mib"]


def test_cli_json_shape(capsys) -> None:
    assert main(["--benchmark", "split_digits", "--methods", "finetune,packnet,nws",
                 "--results", "nonexistent", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"finetune", "packnet", "nws"}
    for entry in out.values():
        assert set(entry) == {"stored_mib", "paper_convention_mib", "paper_mib", "components"}
    assert out["finetune"]["paper_mib"] is None  # the paper has no split_digits numbers
    comps = out["finetune"]["components"]["paper_convention"]["per_task"]
    assert sum(comps.values()) == pytest.approx(out["finetune"]["paper_convention_mib"])


def test_unavailable_method_does_not_crash(capsys) -> None:
    assert main(["--benchmark", "split_digits", "--methods", "finetune,not_a_method",
                 "--results", "nonexistent", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["not_a_method"]["stored_mib"] is None


# docs/reference.md §5: the authors' NWS counting (whole quantiser modules, indices through lzma
# twice) gives these with uniform index streams; MiB.
AUTHORS_RULE = {"split_cifar100": 35.21, "cub_to_sketches": 10.29}
# One uniform draw per stream length (seed 0): draws with seeds 0-11 put the Split-CIFAR-100
# figure between 35.200 and 35.240 MiB (mean 35.226; its 20 tasks share one length, so one
# draw's luck counts 20x); seed 0 gives 35.237 (measured 2026-11-30, torch 2.14.1).
TOLERANCE_MIB = {"split_cifar100": 0.03, "cub_to_sketches": 0.01}


@pytest.mark.parametrize("bench", sorted(AUTHORS_RULE))
def test_nws_counts_as_the_authors_script(reports, bench: str) -> None:
    r = reports[bench]["nws"]
    got = r.as_json()["paper_convention_mib"]
    assert abs(got - AUTHORS_RULE[bench]) <= TOLERANCE_MIB[bench], got
    shared = r.paper_convention.shared
    assert list(shared) == ["quantiser modules: pool + 4 EMA buffers (pickled)"]
    assert "indices (int16 + lzma x2)" in r.paper_convention.per_task[0]
    gap = [n for n in r.notes if n.startswith("paper convention vs paper")]  # shown in tables
    assert len(gap) == 1 and "skewed" in gap[0]
    assert f"{got - r.paper_mib:+.2f} MiB" in gap[0]


def test_quantiser_module_is_the_authors_five_buffers() -> None:
    counts = arch_counts("resnet18")
    modules = _quantiser_modules(counts, 512)
    assert len(modules) == 21  # docs/reference.md §2: 21 NWS layers
    stem = dict(modules[0].named_buffers())
    assert {k: tuple(v.shape) for k, v in stem.items()} == {
        "embed": (49, 512), "cluster_size": (512,), "embed_avg": (49, 512),
        "acum_embed_sum": (49, 512), "acum_embed_onehot_sum": (512,)}
    assert list(QUANTISER_BUFFERS) == list(stem)
    floats = sum(b.numel() for m in modules for b in m.buffers())
    assert floats == 3 * 512 * (49 + 16 * 9 + 3 + 1) + 2 * 21 * 512
    overhead = pickled_nbytes(modules) - 4 * floats
    assert 0 < overhead < 64 * 1024  # pickle/zip overhead only


def test_lzma_passes_compress_again() -> None:
    import numpy as np

    values = np.random.default_rng(1).integers(0, 512, 4096)
    once, twice = lzma_nbytes(values, "<i2"), lzma_nbytes(values, "<i2", passes=2)
    assert 4096 * 9 / 8 < once < 4096 * 2 and once < twice < once + 256


def test_lzma_sizes_are_cached_by_content(tmp_path, monkeypatch) -> None:
    """Sizes equal lzma's own; a second call reads the disk cache (lzma is not run again);
    a changed stream is a new key; an unwritable cache folder still gives sizes."""
    import lzma

    import numpy as np

    from analysis import compressed

    monkeypatch.setenv("NWS_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(2)
    streams = [rng.integers(0, 512, 3000) for _ in range(3)]
    direct = [len(lzma.compress(lzma.compress(s.astype("<i2").tobytes()))) for s in streams]
    assert compressed.lzma_nbytes_many(streams, "<i2", passes=2) == direct
    assert any((tmp_path / "cache" / "lzma").rglob("*.pkl"))

    def refuse(*_a, **_k):
        raise AssertionError("lzma ran again for a cached stream")

    monkeypatch.setattr(lzma, "compress", refuse)
    assert compressed.lzma_nbytes_many(streams, "<i2", passes=2) == direct
    changed = streams[0].copy()
    changed[0] = (changed[0] + 1) % 512
    with pytest.raises(AssertionError, match="lzma ran again"):
        compressed.lzma_nbytes(changed, "<i2", passes=2)
    monkeypatch.undo()

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("NWS_CACHE_DIR", str(blocked))
    assert compressed.lzma_nbytes(streams[1], "<i2", passes=2) == direct[1]


@pytest.mark.parametrize("damage", [b"", b"\x80\x04garbage", None])
def test_a_damaged_lzma_cache_file_is_recomputed_quietly(tmp_path, monkeypatch, caplog,
                                                         damage) -> None:
    """A truncated, garbled or foreign (a valid pickle of a str) cache file gives the true
    size, no logged traceback, and is stored again."""
    import lzma
    import pickle

    import numpy as np

    from analysis import compressed

    monkeypatch.setenv("NWS_CACHE_DIR", str(tmp_path / "cache"))
    values = np.random.default_rng(3).integers(0, 512, 3000)
    true = len(lzma.compress(values.astype("<i2").tobytes()))
    assert compressed.lzma_nbytes(values, "<i2") == true
    (pkl,) = (tmp_path / "cache" / "lzma").rglob("output.pkl")
    pkl.write_bytes(pickle.dumps("abc") if damage is None else damage)
    assert compressed.lzma_nbytes(values, "<i2") == true
    assert not [r.getMessage() for r in caplog.records if "Traceback" in r.getMessage()]
    assert pickle.loads(pkl.read_bytes()) == true


# ResNet-18 by hand: conv weights 11,166,912; BN channels 4,800 (bn1 64; layer1 4x64;
# layer2 4x128 + 128; layer3 4x256 + 256; layer4 4x512 + 512); head input 512.
CONV, BN_CHANNELS, HEAD_IN = 11_166_912, 4_800, 512


@pytest.mark.parametrize(("bench", "classes"), [("split_cifar100", (5,) * 20),
                                                ("cub_to_sketches", (200, 196, 102, 195, 250))])
def test_packnet_cpg_layout_holds_the_hand_counted_bytes(bench, classes) -> None:
    """Each file: its raw tensor bytes counted by hand plus torch.save's framing (pickle and
    zip records, a few hundred bytes per tensor). State dict: float32 conv weights, BN
    weight/bias/mean/var, every head; 20 int64 num_batches_tracked. Masks: 1 byte per conv
    weight. Per task: its BN's 4 floats per channel."""
    state, masks, bn = cpg_checkpoint_parts("resnet18", classes)
    heads = sum(HEAD_IN * n + n for n in classes)
    raw_state = (CONV + 4 * BN_CHANNELS + heads) * 4 + 20 * 8
    assert 0 < state - raw_state < 64 * 1024
    assert 0 < masks - CONV < 16 * 1024
    assert len(bn) == len(classes)
    assert all(0 < b - 4 * BN_CHANNELS * 4 < 32 * 1024 for b in bn)
    total = (state + masks + sum(bn)) / MIB
    # 55.46 MiB (CIFAR, paper 55.2) and 55.68 (CUB, paper 56.0): the CPG-layout figure
    assert round(total, 2) == {"split_cifar100": 55.46, "cub_to_sketches": 55.68}[bench]
