"""Model-name resolution: the GGUF cache folder is keyed on the file's bytes."""

from __future__ import annotations

import os

from loopfit import loading


def test_gguf_cache_folder_keyed_on_bytes_not_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPFIT_CACHE", str(tmp_path / "cache"))
    payload = b"GGUF" + os.urandom(5000)
    a, b, c = tmp_path / "venv-a" / "m.gguf", tmp_path / "venv-b" / "m.gguf", tmp_path / "venv-c" / "m.gguf"
    for f, data in ((a, payload), (b, payload), (c, payload[:-1] + bytes([payload[-1] ^ 1]))):
        f.parent.mkdir()
        f.write_bytes(data)
    # Two installs of the same file (scripts/test.sh's two venvs) share one copy; one changed byte gets its own.
    assert loading._gguf_cache_dir(a) == loading._gguf_cache_dir(b)
    assert loading._gguf_cache_dir(a) != loading._gguf_cache_dir(c)
    assert loading._gguf_cache_dir(a).parent == tmp_path / "cache"
    assert loading._gguf_cache_dir(a).name.startswith("m-")
    # A file rewritten in place (new mtime) is hashed again, not served from the memo.
    c.write_bytes(payload)
    os.utime(c, ns=(1, 1))
    assert loading._gguf_cache_dir(c) == loading._gguf_cache_dir(a)
