"""Does allocating page-locked host memory wait for the GPU's queued work? (The attention rows' copies staged
through it while the decode's replays are in flight: :class:`monailabel_app.model.decoding.LiveRows`.)

Prints, for a new size and for a size the host allocator has cached, how long ``torch.empty(..., pin_memory=True)``
took with the device idle and with about 0.1 s of work queued on it."""

import time

import torch


def timed(make, busy: bool) -> float:
    torch.cuda.synchronize()
    if busy:
        torch.cuda._sleep(200_000_000)  # about 0.1 s of device work queued
    t = time.perf_counter()
    made = make()
    seconds = time.perf_counter() - t
    del made
    torch.cuda.synchronize()
    return seconds


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.cuda.synchronize()
    t = time.perf_counter()
    torch.cuda._sleep(200_000_000)
    torch.cuda.synchronize()
    print(f"queued work: {time.perf_counter() - t:.3f} s")
    mb = 28  # a CT's 8 steps of attention rows (the host allocator rounds blocks up to powers of two)
    cached = set()
    for busy, sizes in ((False, (mb, 128, 256, 512)), (True, (mb, 2 * mb, 40 * mb))):
        for size in sizes:
            size_class = 1 << (size - 1).bit_length()
            state = "cached" if size_class in cached else "new"
            cached.add(size_class)
            s = timed(lambda: torch.empty(size << 18, pin_memory=True), busy)
            print(f"page-locked {size} MB ({state} block of {size_class} MB), {'busy' if busy else 'idle'} device: "
                  f"{s * 1000:.1f} ms")


if __name__ == "__main__":
    main()
