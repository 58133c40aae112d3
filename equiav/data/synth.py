"""Synthetic audio-visual dataset: the default data of the demo, the tests and the benchmarks.

Every clip is real media in the layouts the paper's code reads (all paths under ``--out``):

- ``wav/{video_id}.wav``: 16 kHz mono 16-bit PCM, ``seconds`` long.
- ``video/{video_id}.webm`` (VP9) and/or ``video/{video_id}.mp4`` (H.264): 320x240, 25 fps, yuv420p,
  a keyframe every 2 s exactly (GOP 50, no scene-cut keyframes), so seeking costs what it costs on
  real videos.
- ``frames/frame_{k}/{video_id}.jpg``: the CAV-MAE frames layout, frame k being the frame on screen
  at k + 0.5 s (the last frame whose timestamp is <= k + 0.5 s, index ``floor((k + 0.5) * 25)``),
  for k = 0..9 while that frame exists (k < seconds for whole seconds).
- For each split s in (train, test, retrieval): ``s.json`` (frames layout: ``video_path`` is the
  ``frames`` folder), ``s_webm.json`` and ``s_mp4.json`` (``video_path`` is the video file).
  Only the formats generated get a list: with ``--video-format webm`` alone there are no frames
  and no ``s.json``, only ``s_webm.json``. Retrieval lists the held-out test clips (all of them).
- ``class_labels_indices.csv`` (mids ``/m/syn000``, ...) and ``weights.csv`` (class-balanced
  sampling weights of the train list).

Content is class-conditional and audio-visually correlated. Each class has a sound (a chord with its
own root pitch, chord shape and number of harmonics, plus a third-octave band of noise, both
amplitude-modulated at the class's own rate) and a visual object (shape, hue, stripe texture, motion
direction and speed) whose size and brightness pulse with the same envelope as the sound. Clips vary
pitch (+-2 %), modulation rate and phase, start position, size, speed, colour and background. The
class definitions depend on the class index only, not on the seed, so datasets drawn with different
seeds share their classes. Multi-label mode (AudioSet-like) draws 1-3 classes per clip from a mildly
long-tailed prior and sums their sounds and draws all their objects; single-label mode
(VGGSound-like) draws one class uniformly.

``noise`` (>= 0, default 0.5) is the difficulty knob. It raises the background noise of both
modalities (pink noise in the audio; in the video a cluttered, slowly panning backdrop and a smooth
colour flicker), adds on average ``2 * noise`` distractors per modality (unrelated pulsing tones,
unrelated moving shapes) and shrinks the class signal (sound gain ``1 / (1 + noise)``, object
opacity ``1 / (1 + noise / 2)``). ``noise=0`` gives clean clips.

``in_view`` (default off) keeps each class object inside the centre square of the frame (what the
clean view's resize + centre crop shows), bouncing off its edges, instead of wrapping around the
frame: by default an object is off-screen or outside that square in about half of the frames, so a
single frame often shows no trace of the sound's class. The audio and every random draw are the
same either way; only the objects' paths differ.

Determinism: a clip's content depends only on (seed, clip index), so the worker count changes
nothing; the same seed gives byte-identical JSON/CSV files, identical wav samples, identical JPEG
bytes (for the same PIL) and identical decoded video frames.

Command line::

    python -m equiav.data.synth --out DIR --clips 200 --classes 10 --seed 0 --multi-label \\
        --video-format all --seconds 10
"""

from __future__ import annotations

import argparse
import colorsys
import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from equiav.data.index import (
    Entry,
    compute_weights,
    frame_path,
    write_dataset,
    write_label_csv,
    write_weights,
)

SAMPLE_RATE = 16000
FPS = 25
GOP = 50  # a keyframe every 2 s at 25 fps
WIDTH, HEIGHT = 320, 240
NUM_FRAME_SLOTS = 10  # the frames layout holds frame_0 .. frame_9
JPEG_QUALITY = 90
VIDEO_FORMATS = ("webm", "mp4", "frames")
SPLITS = ("train", "test", "retrieval")
DEFAULT_NOISE = 0.5

# Chord shapes as frequency ratios of the root (just intonation).
CHORDS = {
    "major": (1.0, 5 / 4, 3 / 2),
    "minor": (1.0, 6 / 5, 3 / 2),
    "power": (1.0, 3 / 2, 2.0),
    "sus4": (1.0, 4 / 3, 3 / 2),
    "octave": (1.0, 2.0),
    "single": (1.0,),
}
SHAPES = ("circle", "square", "diamond", "ring", "cross", "triangle", "hbar", "vbar")
HUE_NAMES = (
    "red", "orange", "yellow", "lime", "green", "spring", "cyan", "azure", "blue", "violet",
    "magenta", "rose",
)  # fmt: skip
DIRECTION_NAMES = ("right", "down-right", "down", "down-left", "left", "up-left", "up", "up-right")
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# Fractional parts of square roots of primes: low-discrepancy, mutually unrelated sequences, so
# that class attributes are well spread for any class count and not correlated with each other.
_STEPS = [math.sqrt(p) % 1.0 for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31)]


@dataclass(frozen=True)
class ClassSpec:
    """Everything that defines one synthetic class, in both modalities."""

    index: int
    mid: str
    name: str
    root_hz: float  # chord root
    chord: str  # key of CHORDS
    harmonics: int  # partials per chord note (1/h amplitudes)
    band_hz: float  # centre of the third-octave noise band
    band_mix: float  # share of the noise band in the class sound
    am_hz: float  # amplitude-modulation (pulse) rate shared by sound and picture
    shape: str  # one of SHAPES
    hue: float  # in [0, 1)
    stripe_px: float  # stripe period of the object's texture
    stripe_angle: float  # radians
    direction: float  # motion direction, radians (image y points down)
    speed: float  # pixels per second


@dataclass(frozen=True)
class SynthInfo:
    """What ``generate`` wrote: the dataset lists (keys like ``train``, ``test_webm``) and CSVs."""

    root: Path
    label_csv: Path
    weights_csv: Path
    datasets: dict[str, Path] = field(default_factory=dict)
    formats: tuple[str, ...] = ()
    num_train: int = 0
    num_test: int = 0
    classes: int = 0

    def dataset(self, split: str, fmt: str = "frames") -> Path:
        """Path of the list of ``split`` (train/test/retrieval) in ``fmt`` (frames/webm/mp4)."""
        key = split if fmt == "frames" else f"{split}_{fmt}"
        if key not in self.datasets:
            raise KeyError(f"no {fmt} list for {split}; generated formats: {self.formats}")
        return self.datasets[key]


@dataclass(frozen=True)
class _ClipJob:
    """One clip to render, picklable for the spawn pool."""

    root: str
    video_id: str
    seed: int
    index: int
    classes: tuple[ClassSpec, ...]
    formats: tuple[str, ...]
    seconds: float
    noise: float
    in_view: bool = False


def _frac(c: int, j: int) -> float:
    return (c * _STEPS[j] + 0.5 * _STEPS[j]) % 1.0


def _note_name(hz: float) -> str:
    midi = int(round(69 + 12 * math.log2(hz / 440.0)))
    return f"{NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


def class_specs(classes: int) -> list[ClassSpec]:
    """The class definitions for a dataset of ``classes`` classes (independent of the seed)."""
    if classes < 1:
        raise ValueError(f"classes must be >= 1, got {classes}")
    specs = []
    chords = list(CHORDS)
    for c in range(classes):
        root = 120.0 * 2 ** (3.5 * _frac(c, 0))  # 120 .. 1360 Hz
        chord = chords[int(_frac(c, 1) * len(chords))]
        band = 400.0 * 2 ** (4.0 * _frac(c, 2))  # 400 .. 6400 Hz, upper edge below 8 kHz
        am = 0.5 * 2 ** (3.5 * _frac(c, 4))  # 0.5 .. 5.7 Hz
        shape = SHAPES[c % len(SHAPES)]  # consecutive classes always differ in shape
        hue = _frac(c, 5)
        direction = 2 * math.pi * _frac(c, 8)
        speed = 20.0 + 60.0 * _frac(c, 9)
        name = (
            f"syn {c:03d}: {_note_name(root)} {chord} chord with {band / 1000:.1f} kHz hiss "
            f"pulsing {am:.1f} Hz; {HUE_NAMES[int(hue * 12) % 12]} {shape} moving "
            f"{DIRECTION_NAMES[int(round(direction / (math.pi / 4))) % 8]}"
        )
        specs.append(
            ClassSpec(
                index=c,
                mid=f"/m/syn{c:03d}",
                name=name,
                root_hz=root,
                chord=chord,
                harmonics=1 + int(_frac(c, 3) * 3),
                band_hz=band,
                band_mix=0.2 + 0.4 * _frac(c, 6),
                am_hz=am,
                shape=shape,
                hue=hue,
                stripe_px=8.0 + 12.0 * _frac(c, 7),
                stripe_angle=math.pi * _frac(c, 10),
                direction=direction,
                speed=speed,
            )
        )
    return specs


def frame_index(k: int, fps: int = FPS) -> int:
    """Index of the frame on screen at k + 0.5 s: the last one whose timestamp is <= k + 0.5 s."""
    return (2 * k + 1) * fps // 2


def num_frames(seconds: float) -> int:
    """Number of video frames of a clip of ``seconds``."""
    return int(round(seconds * FPS))


def frame_slots(seconds: float) -> list[int]:
    """The k of ``frame_{k}`` written for a clip of ``seconds`` (those whose frame exists)."""
    n = num_frames(seconds)
    return [k for k in range(NUM_FRAME_SLOTS) if frame_index(k) < n]


def parse_formats(video_format: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"``, one of webm/mp4/frames, or a comma-separated or listed mix, in canonical order."""
    names = video_format.split(",") if isinstance(video_format, str) else list(video_format)
    names = [n.strip() for n in names if n.strip()]
    if "all" in names:
        return VIDEO_FORMATS
    bad = [n for n in names if n not in VIDEO_FORMATS]
    if bad or not names:
        raise ValueError(
            f"video_format must be 'all' or from {VIDEO_FORMATS}, got {video_format!r}"
        )
    return tuple(f for f in VIDEO_FORMATS if f in names)


def draw_labels(seed: int, index: int, classes: int, multi_label: bool) -> tuple[int, ...]:
    """Class indices of clip ``index`` (sorted), from its own RNG stream."""
    rng = np.random.default_rng([seed, index, 0])
    if not multi_label:
        return (int(rng.integers(classes)),)
    count = min(classes, int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])))
    # A mildly long-tailed prior, as AudioSet's, so that class-balanced weights matter.
    prior = 1.0 / np.sqrt(np.arange(1, classes + 1))
    picks = rng.choice(classes, size=count, replace=False, p=prior / prior.sum())
    return tuple(sorted(int(c) for c in picks))


# ----------------------------------------------------------------------------------------------
# Audio


def _envelope(t: np.ndarray, rate: float, phase: float) -> np.ndarray:
    """Pulse envelope in [0.3, 1], shared by a class's sound and its object's size/brightness."""
    return 0.3 + 0.7 * (0.5 + 0.5 * np.sin(2 * np.pi * rate * t + phase))


def _band_noise(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """Unit-RMS white noise restricted to [lo, hi] Hz (in the FFT domain)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spec[(freqs < lo) | (freqs > hi)] = 0.0
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def _pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-RMS 1/f noise above 20 Hz: a natural-sounding background."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spec *= np.where(freqs > 20.0, 1.0 / np.sqrt(np.maximum(freqs, 20.0)), 0.0)
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def _chord(t: np.ndarray, root: float, ratios: Sequence[float], harmonics: int, rng) -> np.ndarray:
    """Unit-RMS sum of the chord's notes with 1/h harmonics, partials above 7.5 kHz left out."""
    x = np.zeros_like(t)
    for ratio in ratios:
        for h in range(1, harmonics + 1):
            f = root * ratio * h
            phase = rng.uniform(0, 2 * np.pi)
            if f < 7500.0:
                x += np.sin(2 * np.pi * f * t + phase) / h
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


@dataclass(frozen=True)
class _Voice:
    """Per-clip draw of one class: the variation of its sound and picture in this clip."""

    spec: ClassSpec
    pitch: float
    am_hz: float
    am_phase: float
    gain: float
    x0: float
    y0: float
    radius: float
    speed: float
    saturation: float
    value: float
    stripe_phase: float


def _draw_voice(rng: np.random.Generator, spec: ClassSpec) -> _Voice:
    return _Voice(
        spec=spec,
        pitch=rng.uniform(0.98, 1.02),
        am_hz=spec.am_hz * rng.uniform(0.9, 1.1),
        am_phase=rng.uniform(0, 2 * np.pi),
        gain=rng.uniform(0.7, 1.0),
        x0=rng.uniform(0, WIDTH),
        y0=rng.uniform(0, HEIGHT),
        radius=rng.uniform(22.0, 34.0),
        speed=spec.speed * rng.uniform(0.8, 1.2),
        saturation=rng.uniform(0.7, 0.95),
        value=rng.uniform(0.8, 1.0),
        stripe_phase=rng.uniform(0, 2 * np.pi),
    )


def _render_audio(
    rng: np.random.Generator, voices: Sequence[_Voice], seconds: float, noise: float
) -> np.ndarray:
    """The clip's int16 waveform: class sounds + distractor tones + pink background."""
    n = int(round(seconds * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    signal_gain = 0.1 / (1.0 + noise)
    x = np.zeros(n)
    for v in voices:
        s = v.spec
        tone = _chord(t, s.root_hz * v.pitch, CHORDS[s.chord], s.harmonics, rng)
        band = _band_noise(rng, n, s.band_hz * 2 ** (-1 / 6), s.band_hz * 2 ** (1 / 6))
        sound = (1 - s.band_mix) * tone + s.band_mix * band
        x += signal_gain * v.gain * sound * _envelope(t, v.am_hz, v.am_phase)
    # Distractors: unrelated pulsing tones, 2 * noise of them on average (stochastic rounding).
    for _ in range(int(math.floor(2 * noise + rng.random()))):
        f = 150.0 * 2 ** rng.uniform(0, 4.5)
        env = _envelope(t, rng.uniform(0.3, 6.0), rng.uniform(0, 2 * np.pi))
        x += 0.7 * signal_gain * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) * env
    x += (0.01 + 0.08 * noise) * _pink_noise(rng, n)
    peak = np.max(np.abs(x))
    if peak > 0.95:  # keep loudness informative; only scale down what would clip
        x *= 0.95 / peak
    return np.round(x * 32767).astype(np.int16)


# ----------------------------------------------------------------------------------------------
# Pictures


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """1 + signed distance to the shape's edge in units of the radius (<= 1 inside)."""
    au, av_ = np.abs(u), np.abs(v)
    if shape == "circle":
        return np.sqrt(u * u + v * v)
    if shape == "square":
        return 1.0 + np.maximum(au, av_) - 0.85
    if shape == "diamond":
        return 1.0 + (au + av_ - 1.2) / math.sqrt(2.0)
    if shape == "ring":
        return 1.0 + np.abs(np.sqrt(u * u + v * v) - 0.75) - 0.25
    if shape == "cross":
        return 1.0 + np.minimum(np.maximum(au - 0.3, av_ - 1.0), np.maximum(av_ - 0.3, au - 1.0))
    if shape == "triangle":  # apex up at (0, -1), base at v = 0.8
        return 1.0 + np.maximum(v - 0.8, (1.8 * au - v - 1.0) / math.hypot(1.8, 1.0))
    if shape == "hbar":
        return 1.0 + np.maximum(au - 1.3, av_ - 0.35)
    if shape == "vbar":
        return 1.0 + np.maximum(av_ - 1.3, au - 0.35)
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(
    img: np.ndarray,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    rgb: np.ndarray,
    opacity: float,
    stripe_px: float,
    stripe_angle: float,
    stripe_phase: float,
) -> None:
    """Alpha-blend a striped, anti-aliased shape into ``img`` (float32 HxWx3), box only."""
    reach = int(math.ceil(1.35 * r)) + 2
    x0, x1 = max(0, int(cx) - reach), min(WIDTH, int(cx) + reach + 1)
    y0, y1 = max(0, int(cy) - reach), min(HEIGHT, int(cy) + reach + 1)
    if x0 >= x1 or y0 >= y1:
        return
    dx = (np.arange(x0, x1, dtype=np.float32) - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) - cy)[:, None]
    d = _shape_distance(shape, dx / r, dy / r)
    alpha = np.clip((1.0 - d) * r + 0.5, 0.0, 1.0) * opacity  # ~1 px anti-aliased edge
    along = dx * math.cos(stripe_angle) + dy * math.sin(stripe_angle)
    shade = 0.7 + 0.3 * np.sin(2 * np.pi * along / stripe_px + stripe_phase)
    patch = img[y0:y1, x0:x1]
    patch += alpha[..., None] * (shade[..., None] * rgb - patch)


def _lerp_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Linearly interpolate ``x`` along ``axis`` from its points to ``n_out`` evenly spread ones."""
    n_in = x.shape[axis]
    pos = np.linspace(0.0, n_in - 1.0, n_out, dtype=np.float32)
    i0 = np.minimum(pos.astype(np.int64), n_in - 2)
    frac = (pos - i0.astype(np.float32)).reshape([-1 if d == axis else 1 for d in range(x.ndim)])
    lo, hi = np.take(x, i0, axis), np.take(x, i0 + 1, axis)
    return lo + frac * (hi - lo)


def _upsample(field_: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of an (h, w, 3) control-point field to (height, width, 3) float32.

    Gathers and blends only: small matmuls get very slow when BLAS threads contend with the pool.
    """
    rows = _lerp_axis(field_.astype(np.float32), height, 0)
    return _lerp_axis(rows, width, 1)


def _wrap(p: float, size: int, margin: float) -> float:
    """Position on a torus one margin wider than the image on each side (objects leave fully)."""
    return (p + margin) % (size + 2 * margin) - margin


def _bounce(p: float, lo: float, hi: float) -> float:
    """Position reflected back and forth between lo and hi (a triangle wave of p)."""
    span = hi - lo
    q = (p - lo) % (2 * span)
    return lo + (q if q <= span else 2 * span - q)


@dataclass(frozen=True)
class _Sprite:
    """A moving, striped shape; its size and brightness pulse with its envelope."""

    shape: str
    x0: float
    y0: float
    vx: float  # pixels per second
    vy: float
    radius: float
    rgb: tuple[float, float, float]  # 0..255 at full brightness
    opacity: float
    stripe_px: float
    stripe_angle: float
    stripe_phase: float
    am_hz: float
    am_phase: float
    in_view: bool = False  # bounce inside the frame's centre square instead of wrapping

    def draw(self, img: np.ndarray, t: float) -> None:
        env = float(_envelope(np.float64(t), self.am_hz, self.am_phase))
        r = self.radius * (0.8 + 0.4 * env)
        margin = 1.4 * self.radius * 1.2  # beyond the largest pulsed extent
        x, y = self.x0 + self.vx * t, self.y0 + self.vy * t
        if self.in_view:
            # Largest pulsed extent 1.2 * radius; the square is the centre crop of the clean view.
            inset, side = 1.2 * self.radius, min(WIDTH, HEIGHT)
            x0, y0 = (WIDTH - side) / 2, (HEIGHT - side) / 2
            cx = _bounce(x, x0 + inset, x0 + side - inset)
            cy = _bounce(y, y0 + inset, y0 + side - inset)
        else:
            cx, cy = _wrap(x, WIDTH, margin), _wrap(y, HEIGHT, margin)
        rgb = np.array(self.rgb, np.float32) * (0.75 + 0.25 * env)
        _draw_shape(
            img, self.shape, cx, cy, r, rgb, self.opacity, self.stripe_px, self.stripe_angle,
            self.stripe_phase,
        )  # fmt: skip


def _class_sprite(v: _Voice, opacity: float, in_view: bool = False) -> _Sprite:
    s = v.spec
    rgb = colorsys.hsv_to_rgb(s.hue, v.saturation, v.value)
    return _Sprite(
        shape=s.shape,
        x0=v.x0,
        y0=v.y0,
        vx=v.speed * math.cos(s.direction),
        vy=v.speed * math.sin(s.direction),
        radius=v.radius,
        rgb=tuple(255.0 * c for c in rgb),
        opacity=opacity,
        stripe_px=s.stripe_px,
        stripe_angle=s.stripe_angle,
        stripe_phase=v.stripe_phase,
        am_hz=v.am_hz,  # the same envelope as the class's sound: audio-visual synchrony
        am_phase=v.am_phase,
        in_view=in_view,
    )


def _distractor_sprite(rng: np.random.Generator) -> _Sprite:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.6, 1.0))
    return _Sprite(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        x0=rng.uniform(0, WIDTH),
        y0=rng.uniform(0, HEIGHT),
        vx=rng.uniform(-60, 60),
        vy=rng.uniform(-60, 60),
        radius=rng.uniform(15, 30),
        rgb=tuple(255.0 * c for c in rgb),
        opacity=0.8,
        stripe_px=rng.uniform(8, 20),
        stripe_angle=rng.uniform(0, np.pi),
        stripe_phase=rng.uniform(0, 2 * np.pi),
        am_hz=rng.uniform(0.3, 6.0),
        am_phase=rng.uniform(0, 2 * np.pi),
    )


class _Painter:
    """Renders the frames of one clip; all random draws are made in the constructor.

    The background noise is made of things video codecs handle as they handle real footage: a
    textured backdrop that pans (motion compensation) and a smooth, slow colour flicker. Per-pixel
    white noise would make the encoders several times slower and the files several times larger.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        voices: Sequence[_Voice],
        seconds: float,
        noise: float,
        in_view: bool = False,
    ):
        n = num_frames(seconds)
        # Backdrop: a gradient between two dull colours plus smooth texture, panning slowly.
        speed, ang = rng.uniform(0, 12), rng.uniform(0, 2 * np.pi)
        self.pan = (speed * math.cos(ang), speed * math.sin(ang))
        self.pad = int(math.ceil(12 * n / FPS)) + 1
        ch, cw = HEIGHT + 2 * self.pad, WIDTH + 2 * self.pad
        c1 = rng.uniform(20, 110) + rng.uniform(-20, 20, 3)
        c2 = rng.uniform(20, 110) + rng.uniform(-20, 20, 3)
        ang = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:ch, 0:cw].astype(np.float32)
        g = xs * math.cos(ang) + ys * math.sin(ang)
        g = (g - g.min()) / (g.max() - g.min())
        # Mostly brightness, little colour: clutter that does not imitate the vivid class colours.
        kh, kw = ch // 24 + 2, cw // 24 + 2
        brightness = rng.normal(0, 10 + 30 * noise, (kh, kw, 1))
        colour = rng.normal(0, 3 + 6 * noise, (kh, kw, 3))
        texture = _upsample(brightness + colour, ch, cw)
        self.canvas = (c1 + g[..., None] * (c2 - c1) + texture).astype(np.float32)
        # Flicker: smooth colour-noise images every 10 frames, linearly interpolated in time.
        self.flicker_knots = rng.normal(0, 3 + 12 * noise, (n // 10 + 2, 4, 5, 3))
        self._flicker: dict[int, np.ndarray] = {}  # upsampled knots, made when first needed
        # Distractors (2 * noise on average, stochastic rounding) are drawn below the classes.
        count = int(math.floor(2 * noise + rng.random()))
        self.sprites = [_distractor_sprite(rng) for _ in range(count)]
        opacity = 1.0 / (1.0 + 0.5 * noise)
        self.sprites += [_class_sprite(v, opacity, in_view) for v in voices]

    def _flicker_image(self, a: int) -> np.ndarray:
        if a not in self._flicker:
            self._flicker[a] = _upsample(self.flicker_knots[a], HEIGHT, WIDTH)
        return self._flicker[a]

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` (uint8 HxWx3), at time i / FPS."""
        t = i / FPS
        oy = self.pad + int(round(self.pan[1] * t))
        ox = self.pad + int(round(self.pan[0] * t))
        a, w = divmod(i, 10)
        lo, hi = self._flicker_image(a), self._flicker_image(a + 1)
        img = hi - lo
        img *= np.float32(w / 10)
        img += lo
        img += self.canvas[oy : oy + HEIGHT, ox : ox + WIDTH]
        for sprite in self.sprites:
            sprite.draw(img, t)
        img += 0.5  # round, not truncate, in the cast below
        return np.clip(img, 0, 255, out=img).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Writing one clip


def _open_video(path: str, fmt: str):
    """An encoder for ``fmt`` with fixed 2 s GOPs; bit-exact and CPU-independent flags keep the
    bytes reproducible."""
    import av

    container = av.open(path, "w", options={"fflags": "+bitexact"})
    if fmt == "webm":
        options = {
            "deadline": "realtime",
            "cpu-used": "8",
            "crf": "30",
            "b": "0",
            "keyint_min": str(GOP),  # equal to the GOP: libvpx then places keyframes only there
        }
        stream = container.add_stream("libvpx-vp9", rate=FPS, options=options)
    else:
        # cpu-independent: x264's own switch for output that does not depend on the CPU's
        # instruction set. Without it, on an AVX-512 CPU (an AMD EPYC VM, 2026-11-27) the
        # same frames encoded to different bytes on the first and later encodes of a process.
        options = {
            "preset": "veryfast",
            "crf": "23",
            "x264-params": f"keyint={GOP}:min-keyint={GOP}:scenecut=0:cpu-independent=1",
        }
        stream = container.add_stream("libx264", rate=FPS, options=options)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    stream.codec_context.gop_size = GOP
    stream.thread_count = 1  # the pool parallelises over clips; one thread keeps output stable
    return container, stream


def _render_clip(job: _ClipJob) -> str:
    """Render and write one clip's wav, video files and JPEG frames; returns its id."""
    import av
    import soundfile as sf
    from PIL import Image

    root = Path(job.root)
    # Separate streams per purpose, all keyed by (seed, clip index) only (labels use stream 0).
    voice_rng, audio_rng, picture_rng = (
        np.random.default_rng([job.seed, job.index, s]) for s in (1, 2, 3)
    )
    voices = [_draw_voice(voice_rng, spec) for spec in job.classes]
    sf.write(
        root / "wav" / f"{job.video_id}.wav",
        _render_audio(audio_rng, voices, job.seconds, job.noise),
        SAMPLE_RATE,
        subtype="PCM_16",
    )
    painter = _Painter(picture_rng, voices, job.seconds, job.noise, job.in_view)
    encoders = [
        _open_video(str(root / "video" / f"{job.video_id}.{fmt}"), fmt)
        for fmt in job.formats
        if fmt != "frames"
    ]
    jpeg_at = (
        {frame_index(k): k for k in frame_slots(job.seconds)} if "frames" in job.formats else {}
    )
    # Without video files only the JPEG frames are needed: frames do not depend on each other.
    todo = range(num_frames(job.seconds)) if encoders else sorted(jpeg_at)
    try:
        for i in todo:
            img = painter.frame(i)
            if i in jpeg_at:
                path = frame_path(str(root / "frames"), job.video_id, jpeg_at[i])
                Image.fromarray(img).save(path, quality=JPEG_QUALITY)
            if encoders:
                # Convert to yuv420p once for both encoders (swscale's default BT.601 matrix).
                frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
                frame.pts = i
                for container, stream in encoders:
                    container.mux(stream.encode(frame))
        for container, stream in encoders:
            container.mux(stream.encode(None))
    finally:
        for container, _ in encoders:
            container.close()
    return job.video_id


# ----------------------------------------------------------------------------------------------
# The dataset


def generate(
    out: str | os.PathLike,
    clips: int,
    classes: int,
    seed: int,
    multi_label: bool = True,
    video_format: str | Sequence[str] = "all",
    seconds: float = 10.0,
    test_fraction: float = 0.3,
    workers: int | None = None,
    noise: float = DEFAULT_NOISE,
    progress: bool = False,
    in_view: bool = False,
) -> SynthInfo:
    """Write a synthetic dataset of ``clips`` clips into ``out`` (see the module docstring).

    The last ``round(clips * test_fraction)`` clips (at least one of each split when
    ``0 < test_fraction < 1`` and ``clips >= 2``) form the test list and the retrieval list.
    ``workers`` processes render clips (default ``os.cpu_count()``; 1 renders in this process).
    """
    formats = parse_formats(video_format)
    if clips < 1:
        raise ValueError(f"clips must be >= 1, got {clips}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if seconds < 1.0:
        raise ValueError(f"seconds must be >= 1 (frame_0 is the frame at 0.5 s), got {seconds}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    specs = class_specs(classes)
    root = Path(out).resolve()
    for sub in ["wav"] + (["video"] if {"webm", "mp4"} & set(formats) else []):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if "frames" in formats:
        for k in frame_slots(seconds):
            (root / "frames" / f"frame_{k}").mkdir(parents=True, exist_ok=True)

    ids = [f"syn{seed}_{i:06d}" for i in range(clips)]
    labels = [draw_labels(seed, i, classes, multi_label) for i in range(clips)]
    jobs = [
        _ClipJob(str(root), ids[i], seed, i, tuple(specs[c] for c in labels[i]), formats,
                 float(seconds), float(noise), bool(in_view))
        for i in range(clips)
    ]  # fmt: skip
    _run_jobs(jobs, workers, progress)

    n_test = int(round(clips * test_fraction))
    if 0 < test_fraction < 1 and clips >= 2:
        n_test = min(max(n_test, 1), clips - 1)
    n_train = clips - n_test
    split_range = {
        "train": range(n_train),
        "test": range(n_train, clips),
        "retrieval": range(n_train, clips),
    }
    datasets = {}
    for split, idx in split_range.items():
        for fmt in formats:
            key = split if fmt == "frames" else f"{split}_{fmt}"
            entries = [
                Entry(
                    video_id=ids[i],
                    wav=str(root / "wav" / f"{ids[i]}.wav"),
                    # The frames layout names the folder holding frame_{k}/{video_id}.jpg.
                    video_path=str(
                        root / "frames" if fmt == "frames" else root / "video" / f"{ids[i]}.{fmt}"
                    ),
                    labels=tuple(specs[c].mid for c in labels[i]),
                )
                for i in idx
            ]
            datasets[key] = root / f"{key}.json"
            write_dataset(datasets[key], entries)
    for split in SPLITS:  # lists of formats not generated now would point at stale media
        for fmt in set(VIDEO_FORMATS) - set(formats):
            (root / (f"{split}.json" if fmt == "frames" else f"{split}_{fmt}.json")).unlink(
                missing_ok=True
            )
    label_csv = root / "class_labels_indices.csv"
    write_label_csv(label_csv, [s.mid for s in specs], [s.name for s in specs])
    weights_csv = root / "weights.csv"
    train_labels = [[specs[c].mid for c in labels[i]] for i in range(n_train)]
    write_weights(weights_csv, compute_weights(train_labels))
    return SynthInfo(
        root=root,
        label_csv=label_csv,
        weights_csv=weights_csv,
        datasets=datasets,
        formats=formats,
        num_train=n_train,
        num_test=n_test,
        classes=classes,
    )


def _run_jobs(jobs: list[_ClipJob], workers: int | None, progress: bool) -> None:
    """Render clips in spawned worker processes (fork is unsafe once torch or threads are loaded).

    ``ProcessPoolExecutor`` rather than ``multiprocessing.Pool``: when a worker dies it raises
    ``BrokenProcessPool`` instead of hanging.
    """
    from tqdm import tqdm

    workers = min(workers or os.cpu_count() or 1, len(jobs))
    with tqdm(total=len(jobs), desc="synth clips", unit="clip", disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                _render_clip(job)
                bar.update()
            return
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for future in as_completed([pool.submit(_render_clip, job) for job in jobs]):
                future.result()  # re-raises a worker's error here
                bar.update()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m equiav.data.synth --out DIR ...``."""
    p = argparse.ArgumentParser(
        prog="python -m equiav.data.synth",
        description="Write a synthetic audio-visual dataset (wav, webm/mp4 and/or JPEG frames, "
        "JSON lists, class_labels_indices.csv, weights.csv).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--clips", type=int, default=200, help="number of clips (default 200)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--multi-label", dest="multi_label", action="store_true", default=True,
        help="1-3 classes per clip, AudioSet-like (default)",
    )  # fmt: skip
    group.add_argument(
        "--single-label", dest="multi_label", action="store_false",
        help="one class per clip, VGGSound-like",
    )  # fmt: skip
    p.add_argument(
        "--video-format",
        default="all",
        help="webm, mp4, frames, all, or a comma-separated mix (default all). Lists are written "
        "only for what is generated: s.json needs frames, s_webm.json webm, s_mp4.json mp4",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10)")
    p.add_argument(
        "--test-fraction", type=float, default=0.3, help="share of test clips (default 0.3)"
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument(
        "--noise",
        type=float,
        default=DEFAULT_NOISE,
        help="difficulty (>= 0; default %(default)s): more background noise and distractors in "
        "both modalities and a weaker class signal; 0 gives clean clips",
    )
    p.add_argument(
        "--in-view",
        action="store_true",
        help="keep the class objects inside the frame's centre square (see the module docstring)",
    )
    a = p.parse_args(argv)
    try:
        info = generate(
            a.out, a.clips, a.classes, a.seed, multi_label=a.multi_label,
            video_format=a.video_format, seconds=a.seconds, test_fraction=a.test_fraction,
            workers=a.workers, noise=a.noise, progress=True, in_view=a.in_view,
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {info.num_train} train + {info.num_test} test clips to {info.root}")
    for key, path in info.datasets.items():
        print(f"  {key}: {path}")


if __name__ == "__main__":
    main()
