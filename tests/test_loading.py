"""Model-name resolution: the GGUF cache folder is keyed on the file's bytes."""

from __future__ import annotations

import os

from loopfit import loading
from loopfit.errors import LoopfitError


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


def _spy_from_pretrained(monkeypatch) -> list[dict]:
    """Record the keyword arguments every `AutoModelForCausalLM.from_pretrained` call in loading.py gets."""
    calls: list[dict] = []
    real = loading.AutoModelForCausalLM.from_pretrained

    def spy(path, *args, **kwargs):
        calls.append(kwargs)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", spy)
    return calls


def test_load_model_keeps_hub_kernels_off_by_default(tiny_source_dir, monkeypatch):
    # transformers >= 5.25 kernelizes by default (use_kernels=None means on: Hub code swapped in at load time on GPU,
    # a hard error where the kernels package is missing); loopfit asks for the eager layers explicitly.
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    calls = _spy_from_pretrained(monkeypatch)
    model = loading.load_model(tiny_source_dir)
    assert calls[-1]["use_kernels"] is False
    assert not getattr(model, "use_kernels", False)
    assert model.config.num_hidden_layers == 6


def test_load_model_hub_kernels_follow_the_users_switch(tiny_source_dir, monkeypatch):
    calls = _spy_from_pretrained(monkeypatch)
    for value, expected in (("1", None), ("true", None), ("y", None), ("0", False), ("no", False), ("", False)):
        monkeypatch.setenv("USE_HUB_KERNELS", value)
        assert loading.hub_kernels_kwargs().get("use_kernels") is expected
    # Only a true value hands the choice to transformers (no use_kernels passed); anything else keeps them off.
    monkeypatch.setenv("USE_HUB_KERNELS", "0")
    loading.load_model(tiny_source_dir)
    assert calls[-1]["use_kernels"] is False
    # An explicit argument wins over the default and reaches transformers with the rest (without the `kernels`
    # package transformers then refuses to load: one LoopfitError line; with it, the CPU load succeeds).
    monkeypatch.delenv("USE_HUB_KERNELS")
    try:
        loading.load_model(tiny_source_dir, use_kernels=True, low_cpu_mem_usage=True)
    except LoopfitError as e:
        assert "ernels" in str(e)
    assert calls[-1]["use_kernels"] is True and calls[-1]["low_cpu_mem_usage"] is True
