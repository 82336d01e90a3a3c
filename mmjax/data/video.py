"""Video files (mp4, webm, avi, mkv, ...) decoded with PyAV into the frames a model reads.

`read_frames(path, n, fps=0.0)` returns uint8 [n, H, W, 3]:

  fps == 0   n frames spread uniformly over the whole video: frame floor(k * total / n) for
             k = 0..n-1 (the sampling of transformers' Video-LLaVA example);
  fps > 0    one frame every 1 / fps seconds from the start (the frame nearest each time),
             the last one repeated when the video is shorter than n / fps seconds.

Decoding runs where the record is read: in Grain's data workers when `data.worker_count > 0`,
never on the training thread's critical path otherwise than through the iterator. A file
that is missing or cannot be decoded is a one-line ValueError naming it.
"""
from __future__ import annotations

import os

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg")


def uniform_indices(total: int, n: int) -> list[int]:
  """n frame indices spread over `total` frames: floor(k * total / n)."""
  return [int(k * total // n) for k in range(n)]


def rate_indices(total: int, n: int, video_fps: float, fps: float) -> list[int]:
  """n frame indices one 1 / fps seconds apart from the start (clipped to the last frame)."""
  return [min(int(round(k * video_fps / fps)), total - 1) for k in range(n)]


def read_frames(path: str, n: int, fps: float = 0.0) -> np.ndarray:
  """uint8 [n, H, W, 3] frames of a video file (see the module docstring)."""
  if not os.path.isfile(path):
    raise ValueError(f"video {path} does not exist")
  try:
    frames = _read(path, n, fps)
  except ValueError as e:
    raise ValueError(f"video {path}: cannot be decoded ({e})") from None
  except Exception as e:  # noqa: BLE001 - PyAV raises its own error types for broken files
    raise ValueError(f"video {path}: cannot be decoded ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
  return frames


def _indices(total, n, rate, fps):
  return uniform_indices(total, n) if fps <= 0 else rate_indices(total, n, rate, fps)


def _read(path, n, fps):
  import av  # an install requirement; imported here so text-only runs never load FFmpeg

  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError("it has no video stream")
    stream = container.streams.video[0]
    rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    total = int(stream.frames or 0)
    if total > 0:  # known length: decode only up to the last frame needed
      want = _indices(total, n, rate, fps)
      keep = set(want)
      got = {}
      for i, frame in enumerate(container.decode(stream)):
        if i in keep:
          got[i] = frame.to_ndarray(format="rgb24")
        if i >= want[-1]:
          break
      if all(i in got for i in want):
        return np.stack([got[i] for i in want])
  with av.open(path) as container:  # unknown (webm, mkv) or wrong length: decode every frame once
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
  if not frames:
    raise ValueError("it holds no frames")
  return np.stack([frames[i] for i in _indices(len(frames), n, rate, fps)])


def write_video(path: str, frames: np.ndarray, fps: float = 10.0) -> str:
  """Writes uint8 [T, H, W, 3] frames as a video file (codec by extension: mp4 H.264, webm
  VP8, avi MJPEG, mkv FFV1); for tests and synthetic data."""
  import av

  codec = {".mp4": "libx264", ".webm": "libvpx", ".avi": "mjpeg", ".mkv": "ffv1"}[os.path.splitext(path)[1]]
  frames = np.asarray(frames, np.uint8)
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=int(fps) if float(fps).is_integer() else fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    if codec == "libx264":
      stream.options = {"crf": "12"}
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return path
