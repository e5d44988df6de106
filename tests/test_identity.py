"""Pin comparison (``adapterctl.identity``): a checkpoint against a pin, pins against each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from adapterctl.checkpoint import open_checkpoint
from adapterctl.errors import Conflict
from adapterctl.identity import base_fingerprint, check_pin, check_same_base, shared_pin
from tests.builders import llama_model, save_base


@dataclass
class P:
    level: str = "fingerprint"
    fingerprint: str | None = "sha256:aa"
    content_digest: str | None = None
    name: str | None = None
    path: str | None = None
    architecture: str | None = None


def test_pins_of_one_base_agree() -> None:
    same = [("a@1", P()), ("b@1", P(content_digest="sha256:c1"))]
    assert check_same_base(same) == []
    assert check_same_base([("a@1", P(content_digest="x")), ("b@1", P(content_digest="x"))]) == []
    assert check_same_base([("a@1", P()), ("n@1", P(level="name only", fingerprint=None))]) == []


@pytest.mark.parametrize(
    "other",
    [P(fingerprint="sha256:bb"), P(content_digest="sha256:c2")],
    ids=["fingerprint", "content"],
)
def test_pins_of_other_bases_are_refused_or_warned(other: P) -> None:
    pins = [("a@1", P(content_digest="sha256:c1")), ("b@1", other)]
    with pytest.raises(Conflict, match=r"a@1 → sha256:c1, b@1 → sha256:"):
        check_same_base(pins)
    (warning,) = check_same_base(pins, allow_mismatch=True)
    assert warning.startswith("--allow-base-mismatch: the inputs are pinned to different bases")


def test_shared_pin() -> None:
    full = P(content_digest="sha256:c1")
    plain = P()
    assert shared_pin([full, P(content_digest="sha256:c1")]) == (full, True)
    assert shared_pin([full, plain]) == (plain, False)  # the content digest is not shared
    assert shared_pin([full, P(content_digest="sha256:c2")]) is None
    assert shared_pin([plain, P(fingerprint="sha256:bb")]) is None
    assert shared_pin([plain, P(level="none", fingerprint=None)]) is None
    assert shared_pin([]) is None


def test_check_pin_against_a_checkpoint(tmp_path: Path) -> None:
    ckpt = open_checkpoint(save_base(llama_model(), tmp_path / "base"))
    fp = base_fingerprint(ckpt)
    assert check_pin("a@1", P(level="name only", fingerprint=None), ckpt, lambda: None) == (
        "name only"
    )
    assert check_pin("a@1", P(fingerprint=fp), ckpt, lambda: "never asked") == "fingerprint"
    with pytest.raises(Conflict, match=r"a@1 is pinned to base fingerprint sha256:aa"):
        check_pin("a@1", P(), ckpt, lambda: None)
    pinned = P(level="content digest", fingerprint=fp, content_digest="sha256:c1")
    assert check_pin("a@1", pinned, ckpt, lambda: "sha256:c1") == "content digest"
    assert check_pin("a@1", pinned, ckpt, lambda: None) == "fingerprint"  # files not hashed
    with pytest.raises(Conflict, match=r"pinned to base content sha256:c1 .* has sha256:c2"):
        check_pin("a@1", pinned, ckpt, lambda: "sha256:c2")
