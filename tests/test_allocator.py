"""The malloc policy: image-sized arrays come from the heap and their pages are kept for the next one.

Each case runs in its own interpreter: the policy is per process and cannot be taken back."""

import json
import os
import subprocess
import sys

import pytest

from monailabel_app import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import json, threading, numpy as np
from monailabel_app import allocator
before = allocator.mapped_blocks()
on = allocator.keep_freed_memory()
again = allocator.keep_freed_memory()
a = np.ones((134, 512, 512), np.float32)  # a CT's whole-volume map, 140 MB
during = allocator.mapped_blocks()
del a
b = np.ones((134, 512, 512), np.float32)
total = float(b.sum())
del b
in_thread = []

def in_a_thread():  # as a map thread makes a finding's heatmap (a thread's own arena maps it on its own)
    c = np.ones((134, 512, 512), np.float32)
    in_thread.append(allocator.mapped_blocks())

t = threading.Thread(target=in_a_thread)
t.start()
t.join()
print(json.dumps({"on": on, "again": again, "before": before, "during": during, "sum": total,
                  "in_thread": in_thread[0]}))
"""

glibc = pytest.mark.skipif(allocator.mapped_blocks() is None, reason="glibc's malloc only")


def probe(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_large_arrays_come_from_the_heap():
    got = probe(MEDGEMMA_MALLOC="keep")
    assert got["on"] and got["again"]
    assert got["during"] == got["before"]  # the 140 MB array is no mmap of its own
    assert got["sum"] == 134 * 512 * 512
    assert got["in_thread"] == got["before"]  # nor a map thread's (one arena for all threads)


@glibc
def test_system_policy_is_left_alone():
    got = probe(MEDGEMMA_MALLOC="system")
    assert not got["on"]
    assert got["during"] == got["before"] + 1  # glibc maps the large array on its own
    assert got["in_thread"] == got["before"] + 1  # and a thread's


@glibc
def test_a_reader_sets_the_policy(reader):
    assert "on" in allocator._done  # set when the reader was made, before this test asks
    assert allocator.keep_freed_memory() is (os.environ.get(allocator.ENV, "keep") != "system")


EARLY = """
import json, threading, numpy as np
import monailabel_app  # the package alone: no reader made yet
from monailabel_app import allocator
before = allocator.mapped_blocks()
got = []

def early():  # a thread made before any reader (a server's, a benchmark's), its arrays made later
    got.append(allocator.mapped_blocks())
    a = np.ones((134, 512, 512), np.float32)
    got.append(allocator.mapped_blocks())

t = threading.Thread(target=early)
t.start()
t.join()
print(json.dumps({"on": allocator._done.get("on"), "before": before, "in_thread": got}))
"""


@glibc
@pytest.mark.parametrize("policy", ["keep", "system"])
def test_the_package_import_sets_the_policy_for_threads_made_before_a_reader(policy):
    out = subprocess.run([sys.executable, "-c", EARLY], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MEDGEMMA_MALLOC": policy})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["on"] is (policy == "keep")
    grown = got["in_thread"][1] - got["in_thread"][0]  # the 140 MB array mapped on its own, or not
    assert grown == (0 if policy == "keep" else 1)


ZEROS = """
import json, numpy as np
from monailabel_app import allocator
allocator.keep_freed_memory()
out = {}
for dtype in (bool, np.uint8, np.float32, np.float64):
    a = np.full((134, 256, 256), 7, dtype)  # freed memory full of non-zero bytes, reused by the next array
    del a
    z = allocator.zeros((134, 256, 256), dtype)
    out[np.dtype(dtype).name] = [str(z.dtype), list(z.shape), int(np.count_nonzero(z))]
print(json.dumps(out))
"""


@glibc
def test_zeros_are_zeros_in_reused_memory():
    """The maps' zeros (made without holding the interpreter's lock) are zero also where malloc hands back the
    memory of an array just freed (the heap kept, as in the serving process)."""
    out = subprocess.run([sys.executable, "-c", ZEROS], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MEDGEMMA_MALLOC": "keep"})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {name: [name, [134, 256, 256], 0] for name in ("bool", "uint8", "float32", "float64")}


RESERVE = """
import json, sys, numpy as np
from monailabel_app import allocator

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

was = resident()
grown = allocator.reserve(int(sys.argv[1]))
written = resident() - was
before = allocator.heap_bytes()
a = np.ones((64, 1024, 1024), np.float32)  # 256 MiB written, as a reading's arrays are
print(json.dumps({"grown": grown, "written": written, "heap_grew": allocator.heap_bytes() - before,
                  "mapped": allocator.mapped_blocks()}))
"""


@glibc
@pytest.mark.parametrize("policy,reserved", [("keep", 512 << 20), ("keep", 0), ("system", 512 << 20)])
def test_a_grown_heap_gives_the_next_arrays_pages_already_mapped(policy, reserved):
    """After :func:`allocator.reserve` (the 512 MiB written once: resident, their pages mapped) a 256 MiB array is
    taken from them: the heap does not grow. Without it the heap grows by the array; under glibc's own policy
    nothing is grown and the array is a mmap of its own."""
    out = subprocess.run([sys.executable, "-c", RESERVE, str(reserved)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "MEDGEMMA_MALLOC": policy})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if policy == "system":
        assert got["grown"] is None and got["heap_grew"] < 256 << 20 and got["mapped"] >= 1
    elif reserved:
        assert got["grown"]["bytes"] == reserved and got["grown"]["seconds"] >= 0
        assert got["written"] >= 0.9 * reserved  # its pages mapped (resident), not merely promised
        assert got["heap_grew"] == 0
    else:
        assert got["grown"] is None and got["heap_grew"] >= 256 << 20


def test_the_heap_reserve_from_the_environment(monkeypatch):
    monkeypatch.delenv(allocator.RESERVE_ENV, raising=False)
    assert allocator.reserve_bytes() == 4 << 30
    monkeypatch.setenv(allocator.RESERVE_ENV, "0.5")
    assert allocator.reserve_bytes() == 1 << 29
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(allocator.RESERVE_ENV, bad)
        with pytest.raises(ValueError, match="MEDGEMMA_HEAP_RESERVE_GB"):
            allocator.reserve_bytes()
