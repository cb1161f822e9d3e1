"""loopfit.plotting: the one headless matplotlib setup and atomic PNG write every figure goes through."""

from __future__ import annotations

import pytest

from loopfit.plotting import pyplot, save_png


def _figure():
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([1, 2, 3], [3, 1, 2])
    return plt, fig


def test_headless_backend():
    import matplotlib

    pyplot()
    assert matplotlib.get_backend().lower() == "agg"


def test_writes_png_atomically_and_closes(tmp_path):
    plt, fig = _figure()
    out = tmp_path / "fig.png"
    save_png(fig, out, dpi=50)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]  # no temporary file left beside it
    assert not plt.fignum_exists(fig.number)
    # dpi reaches the file: 2 x 2 inches at 50 dpi is 100 x 100 pixels (PNG IHDR width / height, big-endian)
    head = out.read_bytes()
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (100, 100)


def test_failed_write_keeps_the_old_figure(tmp_path, monkeypatch):
    out = tmp_path / "fig.png"
    out.write_bytes(b"old")
    plt, fig = _figure()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", boom)
    with pytest.raises(OSError, match="disk full"):
        save_png(fig, out)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]
    assert not plt.fignum_exists(fig.number)  # closed even when the write failed
