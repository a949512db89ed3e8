"""tests/mutations.py breaks the checkout in seven places, by text; a move or a rewrite of one of them leaves the
script stopping at that mutant, unnoticed until someone runs it. Each mutant's text must still occur exactly once."""

from __future__ import annotations

import pytest
from mutations import MUTATIONS, ROOT


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.path.rsplit("/", 1)[-1] + ":" + m.old[:30] for m in MUTATIONS])
def test_every_mutant_still_finds_the_text_it_breaks(mutation):
    assert (ROOT / mutation.path).read_text().count(mutation.old) == 1, (mutation.path, mutation.old)
    assert all((ROOT / test).is_file() for test in mutation.tests)
