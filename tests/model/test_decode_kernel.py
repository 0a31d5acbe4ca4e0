"""A decode step's attention in one Triton kernel split over the keys (decode_kernel) against the torch path
(capture.decode_weights and decode_attention): in Triton's interpreter on the CPU (a fresh process: the mode is read
when the kernel is defined), compiled for an H100 without a GPU, and compiled on the GPU where there is one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# argv: device, dtype, "attention" | "decode". attention: per case and mask, the largest difference of the weights
# from the torch path's, the output's largest difference over its largest value, whether the output is the same
# without the scores, the weights' sum's largest distance from 1 and their largest value where a key is unseen.
# decode: the tiny model's answers and rows with the kernel (on any device: the interpreter's CPU too) and without
CHECK = """
import sys
import torch
from monailabel_app.model import capture, decode_kernel
device, dtype, what = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
torch.manual_seed(3)
if what == "attention":
    long = 22784 if device == "cuda" else 1500  # a CT's full layer (MedGemma-4B: 8 heads over 4, 256 wide)
    # chunk None: the library's for the device (the interpreter's: 256 over a long cache); 352 ends in a part chunk
    for b, h, kvh, d, length, chunk in ((2, 8, 4, 64, 700, None), (1, 4, 2, 32, 5000, 352), (1, 8, 4, 256, long, None)):
        q = torch.randn(b, h, 1, d, dtype=dtype, device=device)
        k, v = (torch.randn(b, kvh, length, d, dtype=dtype, device=device) for _ in range(2))
        seen = torch.ones(b, 1, 1, length, dtype=torch.bool, device=device)
        seen[0, ..., :300] = False  # left padding over whole chunks
        seen[-1, ..., length - 5:] = False  # cache slots not written yet
        for mask in (seen, None):
            scale = d ** -0.5
            out, weights = decode_kernel.attention(q, k, v, mask, scale, scores=True, chunk=chunk)
            alone, none = decode_kernel.attention(q, k, v, mask, scale, chunk=chunk)
            ref_w = capture.decode_weights(q, k, mask, scale)
            ref = capture.decode_attention(q, k, v, mask, scale, ref_w)
            unseen = weights.masked_select(~seen.expand_as(weights)).abs().max().item() if mask is not None else 0.0
            print((weights - ref_w).abs().max().item(), ((out.float() - ref.float()).abs().max() /
                  ref.float().abs().max()).item(), torch.equal(out, alone) and none is None,
                  (weights.sum(-1) - 1).abs().max().item(), unseen)
elif what == "launch":  # the check before a decoder is compiled, in a small model's shapes
    from types import SimpleNamespace
    config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    print(capture._decode_kernel_launches(config, device, dtype), capture._DECODE_KERNEL_OFF)
else:
    sys.path.insert(0, "tests/model")
    from test_decoding import batch, prompt, tiny_model
    from monailabel_app.model.decoding import prefill_and_decode
    model = tiny_model(device).to(dtype)
    calls = []
    def takes(query, key, mask):
        calls.append(key.shape[2])
        return decode_kernel.supported(query, key, mask)
    images = (torch.rand(4, 3, 28, 28) * 2 - 1).to(device, dtype)
    inputs = batch([prompt([5, 6, 7, 8, 9, 10, 11]), prompt([12, 13])], images)
    runs = []
    for kernel in (False, True):
        capture._decode_kernel_takes = takes if kernel else (lambda query, key, mask: False)
        runs.append(prefill_and_decode(model, inputs, [3], 4, 24, stop_loops=False))
    (a, b) = runs
    decoders = model.__dict__["_medgemma_decoders"].values()
    graphed = all(d.graph is not None and d._compiled is not None for d in decoders) if device == "cuda" else None
    same = [r.token_ids for r in a.rows] == [r.token_ids for r in b.rows]
    print(same, (a.attention - b.attention).abs().max().item(), a.attention.abs().max().item(), graphed,
          sorted(set(calls)))
"""


def check(device: str, dtype: str, what: str, **env) -> list[list]:
    """:data:`CHECK` in a fresh process: its lines, split into values."""
    done = subprocess.run([sys.executable, "-c", CHECK, device, dtype, what], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    return [line.split(" ") for line in done.stdout.split("\n")[:-1]]


def assert_the_torch_paths(lines: list[list], weights: float, output: float) -> None:
    assert len(lines) == 6  # three shapes, with and without a mask
    for line in lines:
        diff_w, diff_out, same_alone, sums, unseen = float(line[0]), float(line[1]), line[2], float(line[3]), \
            float(line[4])
        assert diff_w < weights and diff_out < output, line
        assert same_alone == "True" and sums < 1e-5 and unseen == 0.0, line


def test_the_kernel_gives_the_torch_paths_weights_and_output():
    """Shapes over one chunk and many, chunks wholly unseen (left padding) and keys partly unseen at the end, with and
    without a mask; float16 (Triton's interpreter multiplies bfloat16 wrongly: that type is checked compiled). The
    weights are the torch path's to 1e-5 (the same float32 scores summed in another order), they sum to 1 and are 0
    where a key is not seen; the output is within a few of float16's steps of its largest value."""
    assert_the_torch_paths(check("cpu", "float16", "attention", TRITON_INTERPRET="1"), 1e-5, 4e-3)


def test_keys_a_program_make_one_wave_of_two_programs_a_multiprocessor():
    """decode_kernel.chunk_for over a long cache: the fewest keys a program (a multiple of the kernel's loop step)
    whose programs fit one wave of two a multiprocessor; 256 where the card is not known, 64 over a ring."""
    pytest.importorskip("triton", reason="Triton is declared on Linux only")
    from monailabel_app.model import decode_kernel

    step = decode_kernel.BLOCK_N
    # an H100's or H200's 132: a CT of 85, ~40 and ~16 slices (runs DE and DG: each the fastest of five sizes)
    assert [decode_kernel.chunk_for(n, 4, 132) for n in (22784, 11008, 4352)] == [352, 192, 96]
    for length in (4097, 5000, 11008, 22784, 40000):
        for heads, sms in ((4, 132), (8, 132), (4, 108), (64, 132), (400, 132)):
            chunk = decode_kernel.chunk_for(length, heads, sms)
            waves = heads * -(-length // chunk) / (2 * sms)
            assert chunk % step == 0 and (waves <= 1 or chunk >= length), (length, heads, sms, chunk)
            if chunk > step:  # a chunk one step smaller would make more than one wave
                assert heads * -(-length // (chunk - step)) > 2 * sms, (length, heads, sms, chunk)
    assert decode_kernel.chunk_for(22784, 4, None) == 256 and decode_kernel.chunk_for(1088, 4, 132) == 64
    assert decode_kernel.multiprocessors(torch.device("cpu")) is None


def test_a_decode_with_the_kernel_gives_the_same_answers_and_rows():
    """The tiny model (float16, its three sliding layers' rings and its global layer, a left-padded batch) decodes
    the same tokens with every layer's step attention in the kernel (Triton's interpreter on the CPU), and records
    the same rows on its global layer to float16's precision: the recorder gets the kernel's own weights."""
    [line] = check("cpu", "float16", "decode", TRITON_INTERPRET="1")
    same, diff, top, lengths = line[0], float(line[1]), float(line[2]), " ".join(line[4:])
    assert same == "True" and diff < 2e-3 * top, line
    assert lengths != "[]"  # the kernel was asked: every layer's cache length


def test_a_kernel_that_cannot_run_leaves_the_decode_steps_on_the_torch_path(monkeypatch, caplog):
    """capture.decode_kernel_works, before a decoder is compiled: where the kernel launches (Triton's interpreter
    here) the steps over long caches ask for it; where it raises (no compiler for Triton's launcher, say) one warning,
    and no step asks for it from then on (each would fail: the step's compile, then its eager run)."""
    from types import SimpleNamespace

    from monailabel_app.model import capture

    assert check("cpu", "float16", "launch", TRITON_INTERPRET="1") == [["True", "False"]]

    class Broken:
        @staticmethod
        def supported(query, key, mask):
            return True

        @staticmethod
        def attention(*args, **kwargs):
            raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(capture, "_decode_kernel", lambda: Broken)
    monkeypatch.setattr(capture, "_DECODE_KERNEL_OFF", False)
    monkeypatch.setattr(capture, "_DECODE_KERNEL_CHECKED", set())
    long, short = torch.zeros(1, 2, 5000, 32), torch.zeros(1, 2, 700, 32)
    on_gpu = SimpleNamespace(is_cuda=True)  # a step's query as the check sees it
    assert capture._decode_kernel_takes(on_gpu, long, None) and not capture._decode_kernel_takes(on_gpu, short, None)
    config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    assert not capture.decode_kernel_works(config, "cpu", torch.float16, 5000)  # not CUDA: nothing launched
    with caplog.at_level("WARNING", logger=capture.__name__):
        assert not capture.decode_kernel_works(config, "cuda", torch.bfloat16, 700)  # a film's: nothing launched
        assert not capture._DECODE_KERNEL_OFF
        assert not capture._decode_kernel_launches(config, "cpu", torch.float16)
        assert not capture.decode_kernel_works(config, "cuda", torch.bfloat16, 5000)  # off: not tried again
    warned = [r.getMessage() for r in caplog.records if r.name == capture.__name__]
    assert len(warned) == 1 and "C compiler" in warned[0] and "torch path" in warned[0], warned
    assert not capture._decode_kernel_takes(on_gpu, long, None)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_kernel_compiles_for_an_h100(dtype):
    """The kernel compiled for an H100 (sm_90; no GPU needed) in each half type, with and without a mask and the
    scores, over a CT's chunks (352 keys: one wave on an H100; 256) and a ring's: the interpreter's bfloat16
    products are wrong, so this is where a bfloat16 kernel that does not build would show before a GPU session."""
    triton = pytest.importorskip("triton", reason="Triton is declared on Linux only")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from monailabel_app.model import decode_kernel

    kind = {"bfloat16": "bf16", "float16": "fp16"}[dtype]
    signature = {"q_ptr": f"*{kind}", "k_ptr": f"*{kind}", "v_ptr": f"*{kind}", "seen_ptr": "*u8", "m_ptr": "*fp32",
                 "l_ptr": "*fp32", "acc_ptr": "*fp32", "scores_ptr": "*fp32", "length": "i32", "kv_heads": "i32"}
    for chunk, masked in ((352, True), (256, True), (64, False)):
        constants = dict(GROUP=2, ROWS=decode_kernel.ROWS, D=256, CHUNK=chunk, BLOCK_N=decode_kernel.BLOCK_N,
                         MASKED=masked, SCORES=masked)
        source = ASTSource(fn=decode_kernel._partials, signature=dict(signature, **{k: "constexpr" for k in constants}),
                           constexprs=constants)
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=decode_kernel.OPTIONS).asm["ptx"]
        assert ".entry _partials" in ptx


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel: GPU only")
def test_the_kernel_on_the_gpu_gives_the_torch_paths_weights_and_output():
    """Compiled on the GPU in bfloat16, the model's type, up to a CT's full layer (22,784 keys, 8 heads over 4, 256
    wide); then the tiny model's decode with the kernel compiled into its CUDA graphs: both decoders compiled and
    captured (run CY's first decode with the kernel was neither: Inductor could not lower the mask's view as bytes,
    and the step ran eagerly with the same tokens)."""
    assert_the_torch_paths(check("cuda", "bfloat16", "attention"), 1e-5, 2e-2)
    [line] = check("cuda", "bfloat16", "decode")
    assert line[0] == "True" and float(line[1]) < 2e-2 * float(line[2]) and line[3] == "True", line
