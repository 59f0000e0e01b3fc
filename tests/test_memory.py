"""fedmerge.memory: freed heap pages go back to the OS, and a client reply releases what its request freed."""

from pathlib import Path

import pytest

from fedmerge import memory

pytestmark = pytest.mark.skipif(memory._glibc() is None, reason="needs glibc (malloc_trim): Linux only")


def rss_mib() -> float:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def test_release_returns_fragmented_free_heap_to_the_os():
    # 64 KiB blocks stay below glibc's mmap threshold, so they come from the heap; keeping every 16th alive
    # fragments it, so free() alone cannot shrink the heap top and only malloc_trim gives the pages back
    blocks = [bytearray(64 * 1024) for _ in range(3200)]  # 200 MiB, touched (zero-filled)
    kept = blocks[::16]
    del blocks
    before = rss_mib()
    assert memory.release_freed_memory() is True
    after = rss_mib()
    assert before - after > 100, f"RSS {before:.0f} -> {after:.0f} MiB: freed heap was not returned"
    assert len(kept) == 200


def test_client_reply_releases_memory(monkeypatch):
    from flwr.app import RecordDict

    from fedmerge.runners import client, protocol

    calls = []
    monkeypatch.setattr(client, "release_freed_memory", lambda: calls.append(1) or True)
    state = object.__new__(client.ClientState)
    state.domain = type("D", (), {"name": "d"})()
    reply = client.ClientState.handle(state, protocol.QUERY, RecordDict())
    assert protocol.INFO in reply and calls == [1]
    with pytest.raises(Exception):
        client.ClientState.handle(state, "nonsense", RecordDict())
    assert calls == [1, 1], "a failing request must release its memory too"


def _pss_file_bytes() -> int:
    """The file-backed part of this process's PSS (shared libraries): it shrinks when another process maps the same
    library pages, which a loaded machine's concurrent processes do (CI under load saw PSS grow by 45 MB for 64 MiB)."""
    rollup = open("/proc/self/smaps_rollup").read().splitlines()
    return next((int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss_File:")), 0)


def test_pss_bytes_counts_touched_pages():
    import numpy as np

    before, file_before = memory.pss_bytes(), _pss_file_bytes()
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, every page touched
    grown = memory.pss_bytes() - before - (_pss_file_bytes() - file_before)  # what other processes' sharing moved aside
    assert grown > 48 * 2**20
    del block
    with pytest.raises(OSError):
        memory.pss_bytes(2**31 - 1)  # no such process
