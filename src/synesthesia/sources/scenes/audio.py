"""Impact sounds by modal synthesis: what a struck object of a given size and material sounds like.

A struck solid rings as a sum of exponentially damped modes (van den Doel & Pai,
"The sounds of physical shapes", Presence 1998; van den Doel, Kry & Pai,
"FoleyAutomatic", SIGGRAPH 2001)::

    y(t) = Σ_k a_k · exp(−δ_k t) · sin(2π f_k t),   t ≥ t_hit

- frequencies scale inversely with size: ``f_k = (K_m / L) · λ_k``, where L is
  the object's largest dimension, ``K_m`` a material constant (Hz·m, standing
  for the speed of sound c = √(E/ρ) times the wall-thickness ratio of a
  bending shell, f ∝ c·t/L²) and λ_k the mode ratios of its shape;
- damping follows the material's internal friction (loss factor η):
  ``δ_k = π · f_k · η`` (a constant Q = 1/η per material), so metal rings,
  wood knocks and rubber thuds;
- the excitation is a short contact pulse whose duration grows as the material
  gets softer (Hertzian contact), which also low-passes the modes;
- a little room: one early reflection and a noise floor.

Size and material are therefore both readable from the sound (pitch × decay),
and neither depends on the camera.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AcousticMaterial:
    modal_constant: float  # K_m in Hz·m: fundamental × largest dimension
    loss_factor: float  # η: δ = π f η
    contact_ms: float  # duration of the contact pulse


ACOUSTICS = {
    "metal": AcousticMaterial(modal_constant=500.0, loss_factor=0.002, contact_ms=0.3),
    "wood": AcousticMaterial(modal_constant=250.0, loss_factor=0.03, contact_ms=1.0),
    "rubber": AcousticMaterial(modal_constant=90.0, loss_factor=0.15, contact_ms=4.0),
}

# Mode frequency ratios λ_k: a free-free bar (box), a closed shell (cylinder),
# and the spheroidal modes of a sphere (n = 2, 3, 4 …, normalised).
MODE_RATIOS = {
    "box": (1.0, 2.756, 5.404, 8.933, 13.34),
    "cylinder": (1.0, 1.59, 2.14, 2.65, 3.91, 5.12),
    "sphere": (1.0, 1.54, 2.03, 2.50, 2.96, 3.41),
}


def impact_sound(
    rng: np.random.Generator, shape: str, material: str, size: float, rate: int = 16000, seconds: float = 0.5
) -> tuple[np.ndarray, dict]:
    """A mono float32 waveform in [-1, 1] and its modal parameters (for the metadata)."""
    acoustic = ACOUSTICS[material]
    n = int(round(rate * seconds))
    t = np.arange(n, dtype=np.float32) / np.float32(rate)
    ratios = np.asarray(MODE_RATIOS[shape]) * rng.uniform(0.98, 1.02, len(MODE_RATIOS[shape]))
    freqs = acoustic.modal_constant / size * ratios
    keep = freqs < 0.45 * rate
    freqs = freqs[keep]
    decays = np.pi * freqs * acoustic.loss_factor * rng.uniform(0.85, 1.15, freqs.size)
    # Strike position sets the amplitudes; higher modes are excited less.
    amps = rng.uniform(0.3, 1.0, freqs.size) / np.sqrt(np.arange(1, freqs.size + 1))
    # A contact pulse of duration τ excites frequencies below ~1/τ (raised-cosine spectrum).
    tau = acoustic.contact_ms * 1e-3 * rng.uniform(0.8, 1.25)
    amps = amps * np.abs(np.sinc(freqs * tau)) ** 0.5
    onset = rng.uniform(0.005, 0.02)
    phases = rng.uniform(0, 2 * np.pi, freqs.size)
    # float32 throughout: the modes are the bulk of the work and 16-bit output needs no more.
    tt = np.maximum(t - np.float32(onset), np.float32(0))[None, :]
    f32 = np.float32
    modes = np.exp(-decays.astype(f32)[:, None] * tt)
    modes *= np.sin(f32(2 * np.pi) * freqs.astype(f32)[:, None] * tt + phases.astype(f32)[:, None])
    wave = amps.astype(f32) @ modes
    wave[t < onset] = 0.0
    # Attack: the contact pulse itself (a short raised-cosine click).
    pulse_len = max(int(tau * rate), 2)
    pulse = np.hanning(pulse_len + 2)[1:-1]
    start = int(onset * rate)
    end = min(start + pulse_len, n)
    wave[start:end] += 0.5 * pulse[: end - start] * rng.choice([-1.0, 1.0])
    # Room: one early reflection (3–12 ms later) and a noise floor around −50 dB.
    delay = int(rng.uniform(0.003, 0.012) * rate)
    wave[delay:] += rng.uniform(0.1, 0.3) * wave[:-delay]
    wave /= np.max(np.abs(wave)) + 1e-9
    wave *= rng.uniform(0.5, 0.9)
    wave += rng.normal(0.0, 10 ** (-50 / 20), n)
    params = {
        "freqs_hz": [round(float(f), 2) for f in freqs],
        "decays_per_s": [round(float(d), 3) for d in decays],
        "onset_s": round(float(onset), 4),
    }
    return np.clip(wave, -1.0, 1.0).astype(np.float32), params
