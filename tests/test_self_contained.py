"""The checkout holds everything its tests read: a fresh clone runs the whole suite (issue 14, defect 1)."""

import re

from conftest import FIXTURES, ROOT, read_key_fixture


def test_key_fixtures_are_in_the_checkout():
    assert FIXTURES.resolve().is_relative_to(ROOT.resolve())
    sizes = {name: len(read_key_fixture(name))
             for name in ("ae_keys.txt", "flux_dev_keys.txt", "flux_dev_diffusers_keys.txt")}
    assert all(n > 100 for n in sizes.values()), sizes


def test_no_test_reads_above_the_checkout():
    # tests/x.py: parents[0] is tests/, parents[1] the checkout; anything higher leaves the repository
    climbing = re.compile(r"parents\[[2-9]\]|\"shared\"")
    offenders = [p.name for p in (ROOT / "tests").glob("*.py")
                 if p.name != "test_self_contained.py" and climbing.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
