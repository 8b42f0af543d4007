"""Upload decoding benchmark: in-process PyAV decode vs the isolated child process.

    python -m scripts.bench_decode [--repeats 15] [--out results/bench_decode.json]

Typical uploads (speech-like tones in wav, mp3, m4a and webm at browser and phone
rates, 5 s and 60 s) are decoded both ways; the JSON holds the median milliseconds
of each and the overhead of the child process, plus the fork server's start.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path
from statistics import median

import av
import numpy as np

from musetalk_warm.media import isolate
from musetalk_warm.media.decode import decode_audio

UPLOADS = [  # (container, codec, rate, channels, seconds)
    ("wav", "pcm_s16le", 48000, 1, 5.0),
    ("mp3", "libmp3lame", 44100, 2, 5.0),
    ("mp4", "aac", 48000, 2, 5.0),
    ("webm", "libopus", 48000, 1, 5.0),
    ("wav", "pcm_s16le", 48000, 2, 60.0),
]


def make_upload(fmt: str, codec: str, rate: int, channels: int, seconds: float) -> bytes:
    """A speech-band chirp, encoded with PyAV into an in-memory file."""
    t = np.arange(int(rate * seconds)) / rate
    mono = (0.4 * np.sin(2 * np.pi * (200 + 100 * np.sin(t)) * t)).astype(np.float32)
    layout = "stereo" if channels == 2 else "mono"
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        size = stream.codec_context.frame_size or 1024
        for start in range(0, len(mono), size):
            block = np.repeat(mono[None, start : start + size], channels, axis=0).T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="flt", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        container.mux(stream.encode(None))
    return buf.getvalue()


def _median_ms(fn, data: bytes, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(data)
        times.append(time.perf_counter() - t0)
    return round(1000 * median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("results/bench_decode.json"))
    args = parser.parse_args()

    t0 = time.perf_counter()
    isolate.start()
    start_ms = round(1000 * (time.perf_counter() - t0), 1)
    rows = []
    for fmt, codec, rate, channels, seconds in UPLOADS:
        data = make_upload(fmt, codec, rate, channels, seconds)
        inside = _median_ms(decode_audio, data, args.repeats)
        child = _median_ms(isolate.decode_audio_isolated, data, args.repeats)
        rows.append({
            "upload": f"{fmt}/{codec} {rate} Hz x{channels}, {seconds:g} s", "bytes": len(data),
            "in_process_ms": inside, "isolated_ms": child, "overhead_ms": round(child - inside, 2),
        })
        print(json.dumps(rows[-1]))
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_1min": os.getloadavg()[0]},
        "repeats": args.repeats,
        "fork_server_start_ms": start_ms,
        "uploads": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
