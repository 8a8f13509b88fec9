"""A Score Vision (Bittensor subnet 44) miner's challenge handler on top of the engine.

What a miner does with the engine::

    miner = Miner("https://cdn.example.com/")            # once, at miner start
    response = miner.handle_challenge({"challenge_id": "c1",
                                       "video_url": "https://cdn.example.com/clip.mp4"})

``Miner`` spawns one ``Engine`` when the miner starts (supervisor, fetchers, decoders and
the GPU worker, which loads the models once), pre-warms pooled connections to the CDN
origin, and then turns every challenge into one ``Engine.process`` call. The response has
the shape the validator expects::

    {"challenge_id": "c1",
     "frames": [{"frame_number": 0,
                 "keypoints": [[x, y], ...],
                 "objects": [{"id": 0, "bbox": [x1, y1, x2, y2], "class_id": 2}, ...]},
                ...],
     "processing_time": 1.87}

How the models get into the GPU worker
--------------------------------------
A processor is named by a ``module:factory`` spec and the factory only receives the
device, so the models are chosen by an environment variable instead of by arguments:

* ``miner_processor(device)`` (the spec ``examples.sn44_miner:miner_processor``) reads
  ``SN44_MODELS=module:builder``; the builder takes the ``torch.device`` and returns
  ``(detector, keypoint_model)``.
* The default builder, ``yolo_models``, loads the miner's real ultralytics YOLO weights from
  ``SN44_DETECTOR_WEIGHTS`` and ``SN44_KEYPOINT_WEIGHTS`` (``SN44_IMGSZ``, default 1280,
  is the long side the frames are scaled to before inference).
* ``stand_in_models`` builds ``StandInDetector`` and ``StandInKeypoints``: tiny torch
  modules with no weights that produce deterministic boxes and keypoints from the picture
  (brightest cells, corners of the green pitch). THEY ARE STAND-INS, NOT MODELS: they let
  this example and its tests run anywhere; their output means nothing to a validator.

``Miner(models=...)`` sets ``SN44_MODELS`` in this process's environment just while the
engine spawns, so the engine's processes inherit it. With an engine run as a service
(``python -m engine run``, see docs/deployment.md) the variable goes into *that* service's
environment instead, and the miner attaches with ``Miner(origin, socket=PATH)``.

The model protocol (what a builder must return)
-----------------------------------------------
Both callables receive the whole batch as a float tensor ``[B, 3, H, W]``, RGB in 0..1, on
the engine's device, in the coordinates of the decoded frame:

* ``detector(x)`` returns one entry per frame: a tensor ``[N, 6]`` of
  ``x1, y1, x2, y2, confidence, class_id`` in pixels (``[N, 4]`` means class 0);
* ``keypoint_model(x)`` returns one entry per frame: a tensor ``[K, 2]`` of ``x, y`` in
  pixels (a third column, a confidence, is ignored here; an undetected keypoint is
  ``[0, 0]``, as the validator expects).

Object ids come from one tracker per video (the engine's per-video processor protocol:
``begin(video)`` makes the video's handler, which sees that video's frames only, in
order): supervision's ByteTrack when ``supervision`` is installed, else ``IoUTracker``
below (greedy IoU matching, same class, a track survives 30 frames unseen). So an id
names the same object across frames and batches, as the validator scores it. Boxes are
clipped to the frame. The video's result (``Report.video_result``) is
``{"tracks": ids handed out, "videos_in_progress": other videos' trackers alive}``.

Failures
--------
A job that fails (``FetchError`` such as an HTTP 404, ``DecodeError``, ``JobTimeout``,
``ProcessorError``) does not raise: ``handle_challenge`` returns the normal response shape
with the frames that were processed before the failure (usually none), the measured
``processing_time`` and an extra ``"error"`` key naming the cause. A miner wants that: the
validator gets a well-formed, prompt answer (an HTTP 500 scores no better than an empty
frame list), the failure is logged, and the engine stays usable for the next challenge.
Only ``EngineClosed`` (the engine itself is gone) is re-raised: no later challenge can
succeed either, so the miner process should fail loudly and be restarted by its
supervisor (pm2, systemd).

Run it::

    python -m examples.sn44_miner https://cdn.example.com/clip.mp4 --stand-in
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import time
from urllib.parse import urlsplit

from engine import Engine, EngineClosed, EngineError, ProcessorError

log = logging.getLogger("sn44_miner")

PROCESSOR = "examples.sn44_miner:miner_processor"
STAND_IN_MODELS = "examples.sn44_miner:stand_in_models"
YOLO_MODELS = "examples.sn44_miner:yolo_models"
MODELS_ENV = "SN44_MODELS"
KEYPOINT_MIN_CONF = 0.5      # YOLO keypoints less confident than this are reported as [0, 0]


# ---------------------------------------------------------------------------------------
# The processor: runs in the engine's GPU worker
# ---------------------------------------------------------------------------------------
def _load_builder(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ProcessorError(f"{MODELS_ENV}={spec!r}: expected module:builder")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProcessorError(f"{MODELS_ENV}={spec!r}: cannot import {module_name}: {exc}") from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ProcessorError(f"{MODELS_ENV}={spec!r}: {module_name} has no callable {attr!r}")
    return builder


def miner_processor(device):
    """Engine processor factory: builds the models named by ``SN44_MODELS`` (default: the
    real YOLO weights) once, and returns the per-video processor (a tracker per video)."""
    spec = os.environ.get(MODELS_ENV, "").strip() or YOLO_MODELS
    models = _load_builder(spec)(device)
    try:
        detector, keypoint_model = models
    except (TypeError, ValueError):
        raise ProcessorError(f"{MODELS_ENV}={spec!r}: the builder must return "
                             "(detector, keypoint_model)") from None
    return TrackingMiner(detector, keypoint_model)


def _run_models(detector, keypoint_model, frames):
    """Both models on one batch: per frame (detection rows, keypoints)."""
    b = frames.shape[0]
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)      # [B, 3, H, W] RGB 0..1
    boxes = list(detector(x))
    points = list(keypoint_model(x))
    if len(boxes) != b or len(points) != b:
        raise ValueError(f"models returned {len(boxes)} detections and {len(points)} "
                         f"keypoint sets for {b} frames")
    return boxes, points


def adapt(detector, keypoint_model):
    """A per-frame processor around the two models: no tracker, so an object's id is its
    index within the frame (what a validator reads as a new object every frame)."""
    def proc(frames, frame_numbers):
        h, w = frames.shape[1], frames.shape[2]
        boxes, points = _run_models(detector, keypoint_model, frames)
        out = []
        for det, kp in zip(boxes, points):
            rows = _rows(det, w, h)
            out.append({"keypoints": _keypoints(kp),
                        "objects": _objects(rows, range(len(rows)))})
        return out
    return proc


class TrackingMiner:
    """The miner's per-video processor: the models are shared, each video gets its own
    tracker (``begin``), dropped when the video ends or fails (``end``/``close``)."""

    def __init__(self, detector, keypoint_model):
        self.detector, self.keypoint_model = detector, keypoint_model
        self.videos: set = set()        # handlers whose video is in progress

    def begin(self, video):
        return _VideoHandler(self, video)


class _VideoHandler:
    def __init__(self, miner: TrackingMiner, video):
        self.miner = miner
        self.tracker = make_tracker(video.fps)
        miner.videos.add(self)

    def __call__(self, frames, frame_numbers):
        h, w = frames.shape[1], frames.shape[2]
        boxes, points = _run_models(self.miner.detector, self.miner.keypoint_model, frames)
        out = []
        for det, kp in zip(boxes, points):
            rows, ids = self.tracker.update(_rows(det, w, h))
            out.append({"keypoints": _keypoints(kp), "objects": _objects(rows, ids)})
        return out

    def end(self):
        self.close()
        return {"tracks": self.tracker.tracks_started,
                "videos_in_progress": len(self.miner.videos)}

    def close(self):
        self.miner.videos.discard(self)


def _rows(det, width: int, height: int) -> list:
    """Detections as [x1, y1, x2, y2, conf, class_id] rows, clipped to the frame."""
    rows = det.detach().float().cpu().tolist() if hasattr(det, "detach") else list(det)
    out = []
    for row in rows:
        x1, y1, x2, y2 = (float(v) for v in row[:4])
        x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
        y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
        conf = float(row[4]) if len(row) > 4 else 1.0
        class_id = int(row[5]) if len(row) > 5 else 0
        out.append([x1, y1, x2, y2, conf, class_id])
    return out


def _objects(rows, ids) -> list:
    return [{"id": int(i), "bbox": [round(r[0], 2), round(r[1], 2), round(r[2], 2), round(r[3], 2)],
             "class_id": int(r[5])} for r, i in zip(rows, ids)]


# ---------------------------------------------------------------------------------------
# Trackers: one per video
# ---------------------------------------------------------------------------------------
def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class IoUTracker:
    """Greedy IoU tracker: each detection takes the free track of its class whose last
    box overlaps it most (IoU >= ``min_iou``), else starts a new track; a track unseen
    for ``max_lost`` frames is dropped. Ids count from 0 per video."""

    def __init__(self, min_iou: float = 0.3, max_lost: int = 30):
        self.min_iou, self.max_lost = min_iou, max_lost
        self.tracks: dict[int, tuple[list, int]] = {}     # id -> (last row, frames unseen)
        self.tracks_started = 0

    def update(self, rows: list) -> tuple[list, list]:
        pairs = sorted(((_iou(r[:4], t[:4]), i, tid) for i, r in enumerate(rows)
                        for tid, (t, _) in self.tracks.items() if int(t[5]) == int(r[5])),
                       reverse=True)
        ids: dict[int, int] = {}
        taken: set = set()
        for iou, i, tid in pairs:
            if iou < self.min_iou:
                break
            if i not in ids and tid not in taken:
                ids[i] = tid
                taken.add(tid)
        for i in range(len(rows)):
            if i not in ids:
                ids[i] = self.tracks_started
                self.tracks_started += 1
        for tid, (row, lost) in list(self.tracks.items()):
            if tid not in taken and lost + 1 > self.max_lost:
                del self.tracks[tid]
            elif tid not in taken:
                self.tracks[tid] = (row, lost + 1)
        for i, row in enumerate(rows):
            self.tracks[ids[i]] = (row, 0)
        return rows, [ids[i] for i in range(len(rows))]


class ByteTrackTracker:
    """supervision's ByteTrack behind ``IoUTracker``'s interface. ByteTrack reports only
    confirmed tracks, so a detection it has not confirmed yet is left out."""

    def __init__(self, fps):
        import supervision as sv
        self.sv = sv
        self.tracker = sv.ByteTrack(frame_rate=int(round(fps or 25)))
        self.seen: set = set()

    @property
    def tracks_started(self) -> int:
        return len(self.seen)

    def update(self, rows: list) -> tuple[list, list]:
        import numpy as np
        arr = np.asarray(rows, dtype=np.float32).reshape(-1, 6)
        det = self.sv.Detections(xyxy=arr[:, :4], confidence=arr[:, 4],
                                 class_id=arr[:, 5].astype(int))
        out = self.tracker.update_with_detections(det)
        kept = [[*map(float, xyxy), float(c), int(k)]
                for xyxy, c, k in zip(out.xyxy, out.confidence, out.class_id)]
        ids = [int(t) for t in out.tracker_id]
        self.seen.update(ids)
        return kept, ids


def make_tracker(fps=None):
    """ByteTrack when supervision is installed, else the IoU tracker."""
    try:
        import supervision  # noqa: F401
    except ImportError:
        return IoUTracker()
    return ByteTrackTracker(fps)


def _keypoints(kp) -> list:
    rows = kp.detach().float().cpu().tolist() if hasattr(kp, "detach") else list(kp)
    return [[round(float(r[0]), 2), round(float(r[1]), 2)] for r in rows]


# ---------------------------------------------------------------------------------------
# Stand-in models (NOT real models): deterministic, weight-free, for the example and tests
# ---------------------------------------------------------------------------------------
def _green_mask(x):
    """Pixels whose green exceeds red and blue by 20 (of 255); x is [B, 3, H, W] in 0..1."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    margin = 20.0 / 255.0
    return (g > r + margin) & (g > b + margin)


def _mask_bbox(mask):
    """Per frame (x1, y1, x2, y2) of the True pixels of mask [B, H, W], and whether any."""
    import torch
    h, w = mask.shape[1], mask.shape[2]
    rows, cols = mask.any(dim=2), mask.any(dim=1)                   # [B, H], [B, W]
    y1 = rows.int().argmax(dim=1)
    y2 = h - rows.flip(1).int().argmax(dim=1)
    x1 = cols.int().argmax(dim=1)
    x2 = w - cols.flip(1).int().argmax(dim=1)
    return torch.stack([x1, y1, x2, y2], dim=1).float(), rows.any(dim=1)


def _stand_in_classes():
    import torch

    class StandInDetector(torch.nn.Module):
        """STAND-IN, not a detector: the ``k`` brightest cells of a ``grid`` x ``grid``
        split of the frame, as class-0 boxes (confidence = the cell's mean brightness)."""

        def __init__(self, k: int = 2, grid: int = 8):
            super().__init__()
            self.k, self.grid = k, grid

        def forward(self, x):
            b, _, h, w = x.shape
            g = self.grid
            luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
            cells = torch.nn.functional.adaptive_avg_pool2d(luma, (g, g)).reshape(b, g * g)
            conf, idx = cells.topk(min(self.k, g * g), dim=1)          # [B, k]
            row, col = (idx // g).float(), (idx % g).float()
            boxes = torch.stack([col * w / g, row * h / g, (col + 1) * w / g, (row + 1) * h / g,
                                 conf, torch.zeros_like(conf)], dim=2)  # [B, k, 6]
            return list(boxes)

    class StandInKeypoints(torch.nn.Module):
        """STAND-IN, not a pitch keypoint model: the 4 corners of the bounding box of the
        green pixels (clockwise from top left); a fixed 2x2 grid when nothing is green."""

        def forward(self, x):
            _, _, h, w = x.shape
            box, found = _mask_bbox(_green_mask(x))
            fixed = torch.tensor([w / 4, h / 4, 3 * w / 4, 3 * h / 4], device=x.device)
            box = torch.where(found[:, None], box, fixed)
            x1, y1, x2, y2 = box.unbind(dim=1)
            corners = torch.stack([torch.stack([x1, y1], 1), torch.stack([x2, y1], 1),
                                   torch.stack([x2, y2], 1), torch.stack([x1, y2], 1)], dim=1)
            return list(corners)                                           # [B][4, 2]

    return StandInDetector, StandInKeypoints


def stand_in_models(device):
    """Builder for ``SN44_MODELS``: the STAND-IN detector and keypoint model (no weights)."""
    detector_cls, keypoints_cls = _stand_in_classes()
    return detector_cls().to(device).eval(), keypoints_cls().to(device).eval()


# ---------------------------------------------------------------------------------------
# The miner's real models: ultralytics YOLO
# ---------------------------------------------------------------------------------------
def _fit_for_yolo(x, imgsz: int):
    """Scale [B, 3, H, W] so the long side is imgsz and pad right/bottom to multiples of 32
    (ultralytics takes a tensor as is, and requires sides divisible by its stride)."""
    import torch.nn.functional as F
    h, w = x.shape[2], x.shape[3]
    scale = imgsz / max(h, w)
    if scale != 1.0:
        x = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))),
                          mode="bilinear", align_corners=False)
    ph, pw = (-x.shape[2]) % 32, (-x.shape[3]) % 32
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=114 / 255)
    return x, scale


def yolo_models(device):
    """Builder for ``SN44_MODELS`` (the default): the miner's YOLO weights, from
    ``SN44_DETECTOR_WEIGHTS`` (players, goalkeepers, referees, ball) and
    ``SN44_KEYPOINT_WEIGHTS`` (pitch keypoints, a YOLO pose model)."""
    import torch
    try:
        from ultralytics import YOLO
    except ImportError:
        raise ProcessorError(
            "the default SN44 models need ultralytics (pip install ultralytics); or set "
            f"{MODELS_ENV}={STAND_IN_MODELS} to run the stand-ins") from None
    paths = {}
    for name in ("SN44_DETECTOR_WEIGHTS", "SN44_KEYPOINT_WEIGHTS"):
        path = os.environ.get(name, "").strip()
        if not path or not os.path.isfile(path):
            raise ProcessorError(f"{name}={path!r}: set it to the miner's YOLO weights file"
                                 if not path else f"{name}={path!r}: no such file")
        paths[name] = path
    imgsz = int(os.environ.get("SN44_IMGSZ", "1280"))
    det_model = YOLO(paths["SN44_DETECTOR_WEIGHTS"])
    kp_model = YOLO(paths["SN44_KEYPOINT_WEIGHTS"])

    def detector(x):
        fitted, scale = _fit_for_yolo(x, imgsz)
        out = []
        for r in det_model.predict(fitted, device=device, verbose=False):
            boxes = r.boxes
            if boxes is None or len(boxes) == 0:
                out.append(torch.zeros((0, 6)))
                continue
            out.append(torch.cat([boxes.xyxy / scale, boxes.conf[:, None], boxes.cls[:, None]],
                                 dim=1))
        return out

    def keypoint_model(x):
        fitted, scale = _fit_for_yolo(x, imgsz)
        out = []
        for r in kp_model.predict(fitted, device=device, verbose=False):
            kps = r.keypoints
            if kps is None or kps.xy.shape[0] == 0:
                out.append(torch.zeros((0, 2)))
                continue
            xy = kps.xy[0] / scale                     # the most confident pitch instance
            if kps.conf is not None:
                xy = xy * (kps.conf[0] >= KEYPOINT_MIN_CONF)[:, None]   # unseen -> [0, 0]
            out.append(xy)
        return out

    return detector, keypoint_model


# ---------------------------------------------------------------------------------------
# The miner side: one engine for the miner's lifetime, one job per challenge
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _env(name: str, value: str | None):
    """Set an environment variable for the duration (the engine's processes copy the
    environment when they are spawned, so it only has to be there at that moment)."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/"


class Miner:
    """SN44 challenge handler: one engine for the miner's lifetime, one job per challenge.

    ``cdn_origin``: origin(s) to pre-warm (``"https://cdn.example.com/"``), or None.
    ``models``: a ``module:builder`` for ``SN44_MODELS``; None keeps the environment's
    (default: the real YOLO weights). ``device``: auto, cpu, cuda or cuda:N.
    ``socket``: attach to an engine service (``python -m engine run``) instead of spawning
    one; the service's own environment then chooses the models and the device.
    Other keyword arguments are engine config overrides (``fetchers=2``, ``batch=16``...).

    ``handle_challenge`` may be called from several threads at once (the engine runs the
    jobs concurrently); ``last_report`` is then the report of whichever finished last.
    """

    def __init__(self, cdn_origin: str | list[str] | None = None, models: str | None = None,
                 device: str = "auto", *, socket: str | None = None, **engine_options):
        self.last_report = None
        if socket is not None:
            self.engine = Engine.connect(socket)
        else:
            with _env(MODELS_ENV, models):
                self.engine = Engine(processor=PROCESSOR, device=device, **engine_options)
        origins = [cdn_origin] if isinstance(cdn_origin, str) else list(cdn_origin or ())
        if origins:
            try:
                self.engine.prewarm(origins)
            except EngineError:
                self.close()
                raise

    def handle_challenge(self, challenge: dict) -> dict:
        """``{"challenge_id", "video_url"}`` -> the validator's response (see the module doc).
        A failed job gives the same shape plus ``"error"``; ``EngineClosed`` is raised."""
        challenge_id, url = challenge["challenge_id"], challenge["video_url"]
        started = time.perf_counter()
        error = None
        try:
            report = self.engine.process(url, processor=PROCESSOR)
        except EngineClosed:
            raise
        except EngineError as exc:
            report = getattr(exc, "report", None)
            error = f"{type(exc).__name__}: {exc}"
            log.warning("challenge %s failed: %s", challenge_id, error)
        elapsed = time.perf_counter() - started
        self.last_report = report
        frames = [{"frame_number": r["frame_number"], **r["result"]}
                  for r in (report.results if report is not None else [])]
        response = {"challenge_id": challenge_id, "frames": frames,
                    "processing_time": round(elapsed, 4)}
        if error is not None:
            response["error"] = error
        return response

    def close(self) -> None:
        """Stop the engine (if this miner spawned it) or detach from the service."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()

    def __enter__(self) -> "Miner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.sn44_miner",
                                 description="Answer one SN44 challenge with the engine.")
    ap.add_argument("url", metavar="URL", help="the challenge's video URL")
    ap.add_argument("--origin", help="CDN origin to pre-warm (default: the URL's origin)")
    ap.add_argument("--stand-in", action="store_true",
                    help=f"use the stand-in models ({STAND_IN_MODELS}), not real weights")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--socket", help="use the engine service on this socket")
    ap.add_argument("--challenge-id", default="local-test")
    ap.add_argument("--show", type=int, default=3, metavar="N",
                    help="frames to print (the rest are counted)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        with Miner(args.origin or origin_of(args.url),
                   models=STAND_IN_MODELS if args.stand_in else None,
                   device=args.device, socket=args.socket) as miner:
            response = miner.handle_challenge({"challenge_id": args.challenge_id,
                                               "video_url": args.url})
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    frames = response["frames"]
    shown = dict(response, frames=frames[:args.show])
    if len(frames) > args.show:
        shown["frames_not_shown"] = len(frames) - args.show
    print(json.dumps(shown, indent=1))
    return 1 if "error" in response else 0


if __name__ == "__main__":
    sys.exit(main())
