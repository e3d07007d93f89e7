"""bridge/mulaw.py: the one G.711 μ-law codec, against its reference points and audioop."""

from __future__ import annotations

import warnings

import pytest

from bridge.mulaw import decode as mulaw_to_linear
from bridge.mulaw import encode as linear_to_mulaw


def test_mulaw_encoder_reference_points():
    """Silence is 0xFF; full scale is 0x80 and 0x00; decoding inverts within a step."""
    assert (linear_to_mulaw(0), linear_to_mulaw(32767), linear_to_mulaw(-32768)) == (
        0xFF, 0x80, 0x00)
    for sample in (-20000, -1000, -10, 10, 1000, 20000):
        assert abs(mulaw_to_linear(linear_to_mulaw(sample)) - sample) <= abs(sample) / 16 + 8


def test_bit_exact_with_audioop_for_every_sample_and_code():
    """Every 16-bit sample encodes, and every code decodes, as audioop does (where it exists)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # gone in Python 3.13
    samples = range(-32768, 32768)
    pcm = b"".join(s.to_bytes(2, "little", signed=True) for s in samples)
    assert bytes(linear_to_mulaw(s) for s in samples) == audioop.lin2ulaw(pcm, 2)
    codes = bytes(range(256))
    assert [mulaw_to_linear(c) for c in codes] == [
        int.from_bytes(audioop.ulaw2lin(codes, 2)[2 * i:2 * i + 2], "little", signed=True) for i in range(256)]
