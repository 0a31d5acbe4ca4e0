"""Gaussian derivative filters in torch, on the model's GPU, equal to ``scipy.ndimage``'s.

The film's blob search (:func:`film_extent.blobs`) filters the whole film with a Laplacian of Gaussian at six
radii, up to 64 mm (kernels of several hundred taps): most of a big film's map time. It runs here on a
GPU, and on the CPU for kernels of :data:`film_extent.FFT_FROM_TAPS` pixels or more (short ones stay with
scipy), with scipy's own kernels (truncated at 4 sigma), its ``reflect`` border (the edge pixel repeated:
``d c b a | a b c d``) and in float64 through the FFT, so that the answer equals scipy's to float rounding
(tested on the CPU and on the lent GPU).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.fft import next_fast_len

TRUNCATE = 4.0  # scipy's default


def gaussian_kernel(sigma: float, order: int) -> np.ndarray:
    """scipy's 1-D Gaussian kernel (order 0: smoothing; 2: second derivative), ``truncate`` sigmas wide."""
    radius = int(TRUNCATE * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    phi /= phi.sum()
    if order == 0:
        return phi
    if order == 2:
        return (x**2 / sigma**4 - 1.0 / sigma**2) * phi
    raise ValueError("order must be 0 or 2")


def correlate1d(t: torch.Tensor, weights: np.ndarray, axis: int) -> torch.Tensor:
    """``scipy.ndimage.correlate1d(t, weights, axis, mode="reflect")`` for an odd-length ``weights``, through
    the FFT: a kernel of a few hundred taps costs what a short one does (a direct float64 convolution of
    that length is slow on a GPU)."""
    return correlate1d_each(t, [weights], axis)[0]


def correlate1d_each(t: torch.Tensor, kernels: list[np.ndarray], axis: int) -> list[torch.Tensor]:
    """:func:`correlate1d` of ``t`` with each of ``kernels`` (odd, all of one length) along ``axis``: the
    reflected lines and their FFT are made once for all of them."""
    if len({len(w) for w in kernels}) != 1:
        raise ValueError("the kernels must have one length")
    r = (len(kernels[0]) - 1) // 2
    n = t.shape[axis]
    x = reflected(t, axis, r).movedim(axis, -1)  # (..., n + 2r)
    size = fft_length(x.shape[-1] + 2 * r)  # no wrap-around into the wanted part at any length >= this
    lines = torch.fft.rfft(x, size)
    out = []
    for weights in kernels:
        k = torch.as_tensor(np.ascontiguousarray(weights[::-1]), dtype=t.dtype, device=t.device)  # correlation as convolution
        full = torch.fft.irfft(lines * torch.fft.rfft(k, size), size)
        out.append(full[..., 2 * r : 2 * r + n].movedim(-1, axis))  # where the kernel lies wholly on the padded line
    return out


def reflected(t: torch.Tensor, axis: int, r: int) -> torch.Tensor:
    """``t`` with ``r`` values more at both ends of ``axis``, scipy's ``reflect`` border (``d c b a | a b c d``)."""
    index = np.pad(np.arange(t.shape[axis]), r, mode="symmetric")
    return t.index_select(axis, torch.as_tensor(index, device=t.device))


def fft_length(n: int) -> int:
    """The smallest length >= ``n`` made of the factors 2, 3 and 5, where FFTs are fastest (scipy's
    ``next_fast_len`` for real input): a line of 1819 (17 x 107) took 40 ms on this project's CPU, one of
    1875 (3 x 5^4) 10 ms, for the same product."""
    return next_fast_len(n, real=True)


def gaussian_laplace(t: torch.Tensor, sigma) -> torch.Tensor:
    """``scipy.ndimage.gaussian_laplace`` of a 2-D tensor, or of each image of a stack (..., rows, cols): per
    axis, the second derivative along it and the smoothing along the other, summed (``sigma``: rows', then
    columns'). Both terms start along the rows from the same reflected lines, whose FFT is made once
    (:func:`correlate1d_each`)."""
    second = [gaussian_kernel(sigma[a], 2)[::-1].copy() for a in range(2)]
    smooth = [gaussian_kernel(sigma[a], 0)[::-1].copy() for a in range(2)]
    along, across = correlate1d_each(t, [second[0], smooth[0]], -2)
    return correlate1d(along, smooth[1], -1) + correlate1d(across, second[1], -1)


def gaussian_filter(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter`` of a 2-D tensor with one ``sigma`` for both axes."""
    weights = gaussian_kernel(sigma, 0)[::-1].copy()
    return correlate1d(correlate1d(t, weights, 0), weights, 1)


def gaussian_filter_direct(t: torch.Tensor, sigmas) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(a, sigmas)`` of a float32 array ``a`` as the tensor ``t`` (any device),
    bit for bit: per axis whose sigma scipy filters (over 1e-15), in order, scipy's kernel summed as its
    correlation of a symmetric kernel does (the centre tap, then each pair of taps from the outermost
    inward: ``out += (x[-j] + x[+j]) * w[j]``, each operation rounded in float64 as the C code's are) over
    the reflected line, and the axis's result stored in float32 before the next axis, as scipy's output
    array is. For short kernels (a CT's smoothing: 5 taps in-plane) on a GPU; long ones: the FFT's
    :func:`correlate1d`."""
    out = t.float()
    for axis, sigma in enumerate(sigmas):
        if sigma <= 1e-15:
            continue
        weights = gaussian_kernel(sigma, 0)
        r = (len(weights) - 1) // 2
        n = out.shape[axis]
        x = reflected(out.double(), axis, r)
        acc = x.narrow(axis, r, n) * float(weights[r])
        for j in range(r, 0, -1):  # the outermost pair first
            acc += (x.narrow(axis, r - j, n) + x.narrow(axis, r + j, n)) * float(weights[r - j])
        out = acc.float()
    return out


def smoothed(pixels: np.ndarray, sigma: float, device=None) -> np.ndarray:
    """float32 ``pixels`` smoothed with a Gaussian of ``sigma`` pixels: on ``device`` when it is a GPU (in
    float64 there), else with scipy."""
    if device is not None and torch.device(device).type == "cuda":
        t = torch.as_tensor(np.asarray(pixels), dtype=torch.float64, device=device)
        return gaussian_filter(t, sigma).float().cpu().numpy()
    from scipy import ndimage

    return ndimage.gaussian_filter(np.asarray(pixels, np.float32), sigma)
