"""The HTML diff in a real browser: headless Chromium renders it to a PNG that is not blank.

Renders with scripts/render_html.sh; skipped when no Chromium is installed
(Debian/Ubuntu: ``apt-get install -y chromium``).
"""

import shutil
import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch

import attnres_compile
from attnres_compile import AttnResConfig
from attnres_compile.report import write_diff_html
from attnres_compile.report.colours import BLOCK_COLOURS
from zoo import tiny_gpt

ROOT = Path(__file__).resolve().parents[3]
RENDER = ROOT / "scripts" / "render_html.sh"
WIDTH, HEIGHT = 1400, 1800
BROWSERS = ("chromium", "chromium-browser", "google-chrome")

pytestmark = pytest.mark.skipif(
    not any(shutil.which(b) for b in BROWSERS),
    reason="no chromium, chromium-browser or google-chrome on PATH (apt-get install -y chromium)",
)


def _unfilter(line: bytearray, prev: bytes, kind: int, bpp: int) -> bytearray:
    """Undo one PNG row filter (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth) in place."""
    if kind == 1:
        for x in range(bpp, len(line)):
            line[x] = (line[x] + line[x - bpp]) & 255
    elif kind == 2:
        line[:] = bytes((p + q) & 255 for p, q in zip(line, prev))
    elif kind == 3:
        for x in range(len(line)):
            left = line[x - bpp] if x >= bpp else 0
            line[x] = (line[x] + ((left + prev[x]) >> 1)) & 255
    elif kind == 4:
        for x in range(len(line)):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], (prev[x - bpp] if x >= bpp else 0)
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return line


def read_png_rows(path: Path) -> tuple[int, int, list[bytes]]:
    """``(width, height, rows)`` of an 8-bit RGB/RGBA, non-interlaced PNG, each row as RGB bytes.

    A few lines of zlib rather than an image library, which the test
    environment need not have; Chromium writes this kind of PNG.
    """
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    bpp = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * bpp
    prev, rows = bytes(stride), []
    for y in range(height):
        start = y * (stride + 1)
        line = _unfilter(bytearray(raw[start + 1:start + 1 + stride]), prev, raw[start], bpp)
        prev = bytes(line)
        rgb = bytearray(width * 3)
        for channel in range(3):  # drop alpha, if any
            rgb[channel::3] = line[channel::bpp]
        rows.append(bytes(rgb))
    return width, height, rows


def _colour_counts(rows: list[bytes]) -> Counter:
    """Pixels per ``(r, g, b)``."""
    counts: Counter = Counter()
    for row in rows:
        counts.update(row[i:i + 3] for i in range(0, len(row), 3))
    return Counter({tuple(colour): n for colour, n in counts.items()})


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def _near(counts: Counter, colour: tuple[int, int, int], tolerance: int = 8) -> int:
    """How many pixels are within ``tolerance`` of ``colour`` in every channel."""
    return sum(n for c, n in counts.items() if all(abs(p - q) <= tolerance for p, q in zip(c, colour)))


@pytest.fixture(scope="module")
def screenshot(tmp_path_factory):
    """The diff page of a 4-block GPT (8 layers, 4 AttnRes blocks), rendered by headless Chromium."""
    model, args, kwargs = tiny_gpt(n_layer=4)
    ep = torch.export.export(model, args, kwargs, strict=False)
    after = attnres_compile.rewrite(ep.module(), AttnResConfig(num_blocks=4))
    out = tmp_path_factory.mktemp("diff")
    page = write_diff_html(out / "diff.html", ep.module(), after, after.meta["attnres_plan"], title="tiny GPT")
    png = out / "diff.png"
    result = subprocess.run(
        ["bash", str(RENDER), page, str(png), str(WIDTH), str(HEIGHT)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    return png


@pytest.fixture(scope="module")
def pixels(screenshot):
    return read_png_rows(screenshot)


def test_render_script_writes_a_png_of_the_window_size(pixels):
    width, height, rows = pixels
    assert (width, height) == (WIDTH, HEIGHT)
    assert len(rows) == HEIGHT and all(len(row) == 3 * WIDTH for row in rows)


def test_rendered_page_is_not_blank_and_shows_every_block_colour(pixels):
    counts = _colour_counts(pixels[2])
    background, most = counts.most_common(1)[0]
    assert len(counts) > 200  # text, bands, diagrams: a blank or failed page has a handful
    assert most < 0.8 * WIDTH * HEIGHT, f"{background} covers {most / (WIDTH * HEIGHT):.0%} of the page"
    for colour in BLOCK_COLOURS[:4]:  # lanes and dots of the stream diagram, section stripes
        assert _near(counts, _rgb(colour)) > 100, colour
    assert _near(counts, _rgb("#1d232b")) > 5000  # the dark page header


def test_render_script_fails_clearly_without_a_page(tmp_path):
    result = subprocess.run(
        ["bash", str(RENDER), str(tmp_path / "missing.html"), str(tmp_path / "out.png")],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 1 and "no such file" in result.stderr
    assert not (tmp_path / "out.png").exists()
