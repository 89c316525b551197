"""heap.trim: the memory a large decode in a worker thread leaves in glibc's heaps goes back to the OS."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import io
from concurrent.futures import ThreadPoolExecutor
from PIL import Image
from atop_serve import heap, imageio
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
buf = io.BytesIO()
Image.new("RGBA", (4000, 4000), (200, 30, 30, 128)).save(buf, "PNG")  # 16 MP, transparent: the costly path
with ThreadPoolExecutor(2) as pool:  # as the service decodes: in threads, two at a time
    for pixels in pool.map(lambda _: imageio.decode(buf.getvalue()), range(4)):
        assert pixels.shape == (32, 32, 3)
held = rss()
assert heap.trim()
print(held, rss())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_trim_returns_what_threaded_decodes_left():
    held, after = map(float, subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                                            check=True).stdout.split())
    assert held - after > 50, (held, after)  # measured here: 156 -> 32 MB (six decodes)
