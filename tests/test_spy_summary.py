"""bench/spy_summary.py: py-spy's raw samples reduced where they were recorded (the device gives back only
small files), so a wrong reduction would go unseen."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import spy_summary  # noqa: E402

RAW = """\
thread (0x7f01): maps_3;_bootstrap (threading.py:1002);_call (monailabel_app/grounding/maps.py:280);blocks_back (monailabel_app/grounding/blocks.py:59);_wrapfunc (numpy/core/fromnumeric.py:54) 7
thread (0x7f02): maps_10;_bootstrap (threading.py:1002);zeros (monailabel_app/allocator.py:73) 2
thread (0x7f03): MainThread;main (bench/fast_path.py:926);compile_fx (torch/_inductor/compile_fx.py:10);x (y.py:1) 50
thread (0x7f03): MainThread;main (bench/fast_path.py:926);run (monailabel_app/model/decoding.py:508);replay (torch/cuda/graphs.py:90) 3
thread (0x7f04): helper_wait_12;wait (threading.py:327) 1

"""


def test_samples_are_counted_by_thread_kind_and_deepest_project_frame():
    kinds, deepest, leaves, skipped = spy_summary.summarise(RAW.splitlines(True), ("torch/_inductor",))
    assert skipped == 50  # the compiling stack left out
    assert kinds == {"maps": 9, "MainThread": 3, "helper_wait": 1}  # maps_3 and maps_10 are one kind
    assert deepest["maps"] == {"blocks_back (blocks.py:59)": 7, "zeros (allocator.py:73)": 2}
    assert leaves["maps"]["_wrapfunc (fromnumeric.py:54)"] == 7  # the leaf is numpy's, the deepest ours
    assert deepest["MainThread"] == {"run (decoding.py:508)": 3}
    assert deepest["helper_wait"] == {"(no project frame)": 1}
