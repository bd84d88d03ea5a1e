"""The README's worked example: one process fills pool blocks with numpy
arrays, another reads them by index, without copies.  The README sends the
indexes through an rseq.Ring; where the ring is not built yet, the same
program runs with a multiprocessing queue in its place."""
from __future__ import annotations

import os
import re
import textwrap

import pytest

import rseq
from helpers.subproc import TESTS_DIR, run_python

README = os.path.join(os.path.dirname(TESTS_DIR), "README.md")


def readme_example() -> str:
    with open(README) as f:
        text = f.read()
    start = text.index("A worked example: one process fills blocks with numpy")
    match = re.search(r"```python\n(.*?)```", text[start:], re.DOTALL)
    assert match, "the worked example's code block is missing"
    return match.group(1)


QUEUE_RING = '''
import multiprocessing as _mp

class _QueueRing:
    """Stand-in for rseq.Ring: put(bytes) -> bool, consume(max, timeout) -> list."""
    _queues = {}

    @classmethod
    def create(cls, name, size_per_cpu, max_record):
        cls._queues[name] = _mp.Queue()
        return cls(name)

    open = classmethod(lambda cls, name: cls(name))
    unlink = staticmethod(lambda name: None)

    def __init__(self, name):
        self.queue = self._queues[name]

    def put(self, data):
        self.queue.put(bytes(data))
        return True

    def consume(self, max, timeout):
        out = []
        try:
            out.append(self.queue.get(timeout=timeout))
            while len(out) < max:
                out.append(self.queue.get_nowait())
        except Exception:
            pass
        return out

rseq.Ring = _QueueRing
'''


@pytest.mark.parametrize("transport", ["ring", "queue"])
def test_readme_worked_example(transport, tmp_path):
    pytest.importorskip("numpy")
    if transport == "ring" and not hasattr(rseq, "Ring"):
        pytest.skip("rseq.Ring is not in this build yet (the queue variant runs instead)")
    code = readme_example()
    suffix = f"{os.getpid()}-{transport}"
    code = code.replace('"frames"', f'"rseq-test-frames-{suffix}"')
    code = code.replace('"frame-ring"', f'"rseq-test-frame-ring-{suffix}"')
    if transport == "queue":
        # fork start method: the child inherits the stand-in and its queue
        code = code.replace("import rseq\n", "import rseq\n" + QUEUE_RING, 1)
    script = tmp_path / "example.py"
    script.write_text(textwrap.dedent(code))
    run_python(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')",
               timeout=120)
    for name in (f"rseq-test-frames-{suffix}", f"rseq-test-frame-ring-{suffix}"):
        assert not os.path.exists(os.path.join("/dev/shm", name))
