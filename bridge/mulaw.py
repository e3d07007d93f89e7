"""G.711 μ-law helpers for the offline agent's voice detection. Pure.

Only energy is needed (is someone speaking?), so each byte maps straight to the magnitude of
its linear sample through a 256-entry table; no audioop (gone in Python 3.13).
"""

from __future__ import annotations

SILENCE = 0xFF  # μ-law code of a zero sample
BYTES_PER_MS = 8  # 8 kHz, one byte a sample


def _magnitude(code: int) -> int:
    code = ~code & 0xFF
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    return (((mantissa << 3) + 0x84) << exponent) - 0x84


MAGNITUDE = tuple(_magnitude(c) for c in range(256))


def mean_magnitude(chunk: bytes) -> float:
    """Mean absolute sample value of a μ-law chunk (0 for silence, up to ~32k)."""
    if not chunk:
        return 0.0
    table = MAGNITUDE
    return sum(table[b] for b in chunk) / len(chunk)


def encode_sample(sample: int) -> int:
    """One linear 16-bit sample → its μ-law code (for synthesising tones)."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = 7
    for bit in range(7):
        if magnitude <= (0xFF << bit):
            exponent = bit
            break
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF
