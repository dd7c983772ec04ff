"""``python -m benchmarks.profile``: the op-count table per method, and its input errors."""

from __future__ import annotations

import pytest

from benchmarks.perf.profile import compute_ops, main


def test_table_lists_each_method_with_its_ratio_to_plain(capsys):
    assert main(["--method", "finetune,packnet", "--batch", "2", "--size", "16",
                 "--warmup", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"finetune", "packnet"}
    assert rows["finetune"][2] == "1.00" and rows["finetune"][5] == "0"  # ratio, syncs
    assert int(rows["packnet"][1]) > int(rows["packnet"][3])  # views are not device work


def test_views_and_profiler_markers_are_not_compute():
    counts = {"aten.view.default": 5, "aten.detach.default": 2, "aten.mul.Tensor": 3,
              "profiler._record_function_enter_new.default": 1}
    assert compute_ops(counts) == 3


@pytest.mark.parametrize("argv", [["--method", "nope"], ["--arch", "nope"],
                                  ["--search", "nope"]])
def test_bad_input_exits_2_naming_the_valid_choices(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "valid" in capsys.readouterr().err or argv[0] == "--search"


@pytest.mark.parametrize("flag,value", [("--batch", "1"), ("--size", "0"), ("--warmup", "0")])
def test_step_sizes_below_their_floor_exit_2_naming_the_flag(flag, value, capsys):
    """Was: a BatchNorm / conv2d traceback (batch 1, size 0), or a first step counted as the
    steady state (warmup 0: optimiser-state creation in the count)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--method", "finetune", flag, value])
    assert exit_info.value.code == 2
    assert f"{flag} {value}: give" in capsys.readouterr().err
