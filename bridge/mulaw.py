"""G.711 μ-law, the one codec of the project: the offline agent's voice detection, and the
loopback peers' tones and voice detection (tools/). Pure; no audioop (gone in Python 3.13).
The relay itself never decodes audio."""

from __future__ import annotations

SILENCE = 0xFF  # μ-law code of a zero sample
BYTES_PER_MS = 8  # 8 kHz, one byte a sample
BYTES_PER_SECOND = 1000 * BYTES_PER_MS

_BIAS = 0x84                  # G.711's bias on 16-bit magnitudes
_BIAS_14, _CLIP_14 = _BIAS >> 2, 8159  # the reference encoder works on 14 bits


def encode(sample: int) -> int:
    """One signed 16-bit sample → its μ-law code (bit-exact with audioop.lin2ulaw)."""
    # Sun's reference encoder works on 14 bits; the floor shift makes negatives round away
    # from zero, which is why encoders that take abs() first differ by one step.
    pcm = sample >> 2
    mask = 0xFF
    if pcm < 0:
        pcm, mask = -pcm, 0x7F
    pcm = min(pcm, _CLIP_14) + _BIAS_14
    segment = max(0, pcm.bit_length() - 6)  # 0..7; 8 only past the clip
    if segment > 7:
        return 0x7F ^ mask
    return ((segment << 4) | ((pcm >> (segment + 1)) & 0x0F)) ^ mask


def decode(code: int) -> int:
    """One μ-law code → its signed 16-bit sample."""
    code = ~code & 0xFF
    magnitude = ((((code & 0x0F) << 3) + _BIAS) << ((code >> 4) & 0x07)) - _BIAS
    return -magnitude if code & 0x80 else magnitude


# Energy is all voice detection needs: each code's magnitude, looked up.
MAGNITUDE = tuple(abs(decode(code)) for code in range(256))


def mean_magnitude(chunk: bytes) -> float:
    """Mean absolute sample value of a μ-law chunk (0 for silence, up to ~32k)."""
    if not chunk:
        return 0.0
    table = MAGNITUDE
    return sum(table[b] for b in chunk) / len(chunk)
