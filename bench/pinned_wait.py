"""Does allocating page-locked host memory wait for the GPU's queued work? (The attention rows' copies staged
through it while the decode's replays are in flight: :class:`monailabel_app.decoding.LiveRows`.)

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
    mb = 28
    for busy in (False, True):
        state = "busy" if busy else "idle"
        for size in ((mb, 2 * mb, 40 * mb) if busy else (mb + 100, 2 * mb + 200, 4 * mb + 400)):  # new size classes
            s = timed(lambda: torch.empty(size << 18, pin_memory=True), busy)
            print(f"page-locked {size} MB, new, {state} device: {s * 1000:.1f} ms")
        s = timed(lambda: torch.empty(mb << 18, pin_memory=True), busy)
        print(f"page-locked {mb} MB again (cached), {state} device: {s * 1000:.1f} ms")


if __name__ == "__main__":
    main()
