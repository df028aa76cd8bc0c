"""The paper's ECG preprocessing written like the reference: per record, per lead, in Python loops.

Written like the reference (ECG-Bench, paper era, ``PreprocessBaseECG`` in
``utils/preprocess_utils.py``), for parity tests and the benchmark baseline. Do not use it to
prepare data: :mod:`elmjax.ecg.preprocess` does the same work on whole ``[batch, 12, n]`` arrays
(``mode="reference"`` reproduces this module to float32 precision, ``mode="standard"`` is the
corrected default).

The steps, each a loop over the 12 leads of one record as in the reference:

1. :func:`advanced_ecg_filter` — zero-phase ``scipy.signal.filtfilt`` with ``(b, a)``
   coefficients: IIR notch at 50 Hz, then at 60 Hz (Q = 30), 4th-order Butterworth band-pass
   0.5–100 Hz, 4th-order Butterworth high-pass 0.05 Hz, each applied to the previous output.
2. :func:`wavelet_denoise` — ``pywt.wavedec(lead, 'db6', level=4)``; threshold
   ``median(|coeffs[-level]|) / 0.6745`` (the coarsest detail band, no ``sqrt(2 ln n)``); soft
   threshold of every detail band, coefficients at or below ``1e-10`` in magnitude and non-finite
   results set to 0; ``waverec``; a reconstruction one sample too long (odd ``n``) is brought back
   to ``n`` samples with ``scipy.signal.resample`` (Fourier); NaN/inf set to 0.
3. :func:`nsample_ecg` — cubic ``scipy.interpolate.interp1d`` (extrapolating) from a
   ``linspace(0, n / fs, n)`` grid to a ``linspace(0, n / fs, int(n * target_fs / fs))`` grid;
   skipped when ``fs == target_fs``; the result is cast to float32.
4. :func:`segment_ecg` — non-overlapping windows of ``seg_len`` samples, the remainder dropped;
   a record whose segments contain NaN/inf is dropped whole.

Arrays here are ``[12, n]`` (leads first, elmjax's convention); the reference held ``[n, 12]``
and looped over columns, which computes the same numbers. Inputs are promoted to float64 as
``wfdb.rdsamp`` delivers them. There is no clamping of band edges: like the reference, a sampling
rate whose Nyquist frequency is at or below 100 Hz raises in ``scipy.signal.butter``.
"""

from __future__ import annotations

import numpy as np
import pywt
from scipy import interpolate, signal


def advanced_ecg_filter(
    ecg: np.ndarray,
    fs: float = 500.0,
    notch_freqs: tuple[float, ...] = (50.0, 60.0),
    highcut: float = 100.0,
) -> np.ndarray:
    """Notch, band-pass and high-pass filters, zero-phase, one lead at a time.

    Args:
      ecg: ``[12, n]`` signal.
      fs: sampling frequency in Hz.
      notch_freqs: mains frequencies to notch out (Q = 30).
      highcut: upper edge of the band-pass in Hz (lower edge 0.5 Hz).

    Returns:
      float64 ``[12, n]``.
    """
    filtered = np.array(ecg, dtype=np.float64)
    quality_factor = 30.0
    for notch_freq in notch_freqs:
        b_notch, a_notch = signal.iirnotch(notch_freq, quality_factor, fs)
        for lead in range(filtered.shape[0]):
            filtered[lead] = signal.filtfilt(b_notch, a_notch, filtered[lead])

    nyquist = 0.5 * fs
    order = 4
    b_band, a_band = signal.butter(order, [0.5 / nyquist, highcut / nyquist], btype="band")
    for lead in range(filtered.shape[0]):
        filtered[lead] = signal.filtfilt(b_band, a_band, filtered[lead])

    b_base, a_base = signal.butter(order, 0.05 / nyquist, btype="high")
    for lead in range(filtered.shape[0]):
        filtered[lead] = signal.filtfilt(b_base, a_base, filtered[lead])
    # filtfilt keeps the length, so the reference's per-lead length check never fires here.
    return filtered


def wavelet_denoise(
    ecg: np.ndarray, wavelet: str = "db6", level: int = 4, epsilon: float = 1e-10
) -> np.ndarray:
    """Wavelet soft-threshold denoising with the reference's threshold, one lead at a time.

    Args:
      ecg: ``[12, n]`` signal.
      wavelet: PyWavelets wavelet name.
      level: decomposition level.
      epsilon: detail coefficients at or below this magnitude are set to 0.

    Returns:
      ``[12, n]`` in the input's dtype, NaN/inf replaced by 0.
    """
    n = ecg.shape[1]
    denoised = np.zeros_like(ecg)
    for lead in range(ecg.shape[0]):
        coeffs = pywt.wavedec(ecg[lead], wavelet, level=level)
        median_abs = np.median(np.abs(coeffs[-level]))
        threshold = 0.0 if median_abs == 0 else median_abs / 0.6745

        def safe_threshold(c: np.ndarray, threshold: float = threshold) -> np.ndarray:
            with np.errstate(divide="ignore", invalid="ignore"):
                shrunk = pywt.threshold(c, threshold, mode="soft")
            return np.where(np.isfinite(shrunk) & (np.abs(c) > epsilon), shrunk, 0)

        new_coeffs = [coeffs[0]] + [safe_threshold(c) for c in coeffs[1:]]
        reconstructed = pywt.waverec(new_coeffs, wavelet)
        if len(reconstructed) != n:
            reconstructed = signal.resample(reconstructed, n)
        denoised[lead] = reconstructed
    return np.nan_to_num(denoised, nan=0.0, posinf=0.0, neginf=0.0)


def nsample_ecg(ecg: np.ndarray, orig_fs: float, target_fs: float) -> np.ndarray:
    """Cubic-spline resampling on linspace time grids, one lead at a time.

    Args:
      ecg: ``[12, n]`` signal.
      orig_fs: its sampling frequency in Hz.
      target_fs: the wanted sampling frequency in Hz.

    Returns:
      float64 ``[12, int(n * target_fs / orig_fs)]``.
    """
    num_leads, num_samples = ecg.shape
    duration = num_samples / orig_fs
    t_original = np.linspace(0, duration, num_samples, endpoint=True)
    t_target = np.linspace(0, duration, int(num_samples * target_fs / orig_fs), endpoint=True)
    resampled = np.zeros((num_leads, len(t_target)))
    for lead in range(num_leads):
        spline = interpolate.interp1d(
            t_original, ecg[lead], kind="cubic", bounds_error=False, fill_value="extrapolate"
        )
        resampled[lead] = spline(t_target)
    return resampled


def segment_ecg(ecg: np.ndarray, seg_len: int) -> np.ndarray:
    """Cuts ``[12, m]`` into non-overlapping ``[k, 12, seg_len]`` windows (remainder dropped)."""
    num_segments = ecg.shape[1] // seg_len
    segments = [ecg[:, i * seg_len : (i + 1) * seg_len] for i in range(num_segments)]
    return np.array(segments).reshape(num_segments, ecg.shape[0], seg_len)


def preprocess_record(
    ecg: np.ndarray, fs: float, target_fs: float = 250.0, seg_len: int = 2500
) -> np.ndarray:
    """The whole reference pipeline for one record.

    Args:
      ecg: ``[12, n]`` signal in mV.
      fs: its sampling frequency in Hz.
      target_fs: output sampling frequency in Hz.
      seg_len: segment length in samples at ``target_fs``.

    Returns:
      float32 ``[k, 12, seg_len]``; ``k = 0`` when the record is too short or its segments
      contain NaN/inf (the reference then skips the whole record).
    """
    filtered = advanced_ecg_filter(ecg, fs=fs)
    denoised = wavelet_denoise(filtered)
    if fs != target_fs:
        resampled = nsample_ecg(denoised, orig_fs=fs, target_fs=target_fs)
    else:
        resampled = denoised
    segments = segment_ecg(resampled.astype(np.float32), seg_len)
    if not np.all(np.isfinite(segments)):
        return np.zeros((0, ecg.shape[0], seg_len), np.float32)
    return segments
