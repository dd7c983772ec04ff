"""``keyframe_every`` without ``codec=delta`` is refused (it would be a no-op that still
changes the run identity)."""

from __future__ import annotations

import pytest

from tests.methods.test_nws_delta import _method


@pytest.mark.parametrize("name", ["fixed", "entropy"])
def test_keyframes_without_the_delta_codec_say_what_to_do(name) -> None:
    with pytest.raises(ValueError, match="applies only to codec=delta"):
        _method(codec=name, keyframe_every=2)
    assert _method(codec=name, keyframe_every="none").keyframe_every is None
    assert _method(codec="delta", keyframe_every=2).keyframe_every == 2
