"""A short run of scripts/soak.py: a chain of live migrations of one self-checking lab
guest, each hop to a fresh destination, and one source whose migrations all end
otherwise (cancelled, destination killed, TLS refused) while QMP clients poll
query-migrate. The long runs (200 of each) are the script's, not CI's."""
import os
import sys

import pytest

from conftest import require

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "scripts"))
import soak  # noqa: E402

pytestmark = pytest.mark.vmigrate


def test_chain_of_live_migrations(ws):
    require("vmigrate")
    r = soak.chain(8, log=lambda _: None)
    assert r["hops"] == 8 and r["violations"] == 0, r
    assert r["passes"] >= 8, r


def test_failed_migrations_leave_the_source_flat(ws, tmp_path):
    require("vmigrate")
    r = soak.abort(15, seed=16, log=lambda _: None, pki_dir=str(tmp_path / "pki"))
    assert r["violations"] == 0, r
    kinds = {kind for kind, _ in r["outcomes"]}
    assert kinds == {"cancel", "kill-destination", "tls-refused"}, r
    assert all(status in ("failed", "cancelled") for _, status in r["outcomes"]), r
    first, last = r["figures"][1], r["figures"][15]
    # Every attempt's descriptors and threads are gone once it ended.
    assert last["fds"] <= first["fds"], r["figures"]
    assert last["threads"] <= first["threads"] + 1, r["figures"]
    assert last["rss_kib"] < first["rss_kib"] + 64 * 1024, r["figures"]
    # The monitor answered throughout (generous: the machine may be loaded).
    assert r["longest_query_migrate_ms"] < 2000, r
