"""Avatar preparation jobs: an uploaded video or photo becomes a prepared avatar while the server runs.

Reading, face detection, placements and masks run in a child process forked from
the fork server of :mod:`musetalk_warm.media.isolate`, so a native crash costs a
failed job and the prep's CPU work never holds this process's GIL. The child
sends JSON progress lines and writes the cache, without latents, under
``<cache_dir>/.jobs/<job>/``; this process then fills the latents with the
runtime's VAE (an encoder that runs on the accelerator thread, batch by batch
between live frames), checks the result as the library would and renames the
folder into place: an avatar appears complete or not at all, and is held loaded
(its first use decodes nothing). A failed job leaves nothing behind, and
:func:`clean_staging` clears what a crash left. The fork server imports what
the children need once (:data:`CHILD_MODULES`). Jobs run one at a time, in
arrival order.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..config import AvatarSettings, Settings, check_quantum, safe_name
from ..errors import BadInput, Conflict, MediaError, MuseTalkWarmError, NotFound, TooManyRequests, VideoError
from ..media.decode import MAX_VIDEO_PIXELS, VIDEO_FORMATS_HINT, check_video_upload
from ..media.isolate import end_child, exit_reason, start_child
from ..metrics import Metrics
from .cache import load_avatar, save_latents
from .library import STAGING_DIR, AvatarLibrary
from .prep import DEMO_AVATAR_ID, Encoder, encode_crops

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm"})
UPLOAD_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})  # prep reads these as photos
# Options of POST /avatars, as `musetalk-warm prep` takes them (avatar section keys).
PREP_OPTIONS = ("bbox_shift", "extra_margin", "fps", "max_frames")
PREP_TIMEOUT_S = 600.0  # a child silent this long (no progress line) is killed
MAX_QUEUED = 8
# What preparation children need, imported once by the fork server (mediapipe alone takes seconds).
CHILD_MODULES = (__name__, "mediapipe.python.solutions.face_mesh")
_MAX_FINISHED = 100  # finished jobs remembered for GET /avatars/{id}, oldest forgotten first
_ACTIVE = ("queued", "preparing")


@dataclass
class PrepJob:
    """One upload being prepared; ``status`` is queued, preparing, ready or failed."""

    job_id: str
    avatar_id: str
    source_name: str
    options: dict[str, Any]
    folder: Path
    status: str = "queued"
    stage: str | None = None
    frames_done: int = 0
    frames_total: int | None = None
    error: dict[str, str] | None = None
    seconds: float | None = None

    @property
    def source(self) -> Path:
        return self.folder / "source" / self.source_name

    def describe(self) -> dict[str, Any]:
        """The job as GET /avatars/{id} shows it (no paths)."""
        return {
            "avatar_id": self.avatar_id,
            "job_id": self.job_id,
            "status": self.status,
            "stage": self.stage,
            "progress": {"frames_done": self.frames_done, "frames_total": self.frames_total},
            "source": {"name": self.source_name},
            "options": self.options,
            "error": self.error,
            "seconds": self.seconds,
        }


def clean_staging(cache_root: str | Path) -> int:
    """Remove what interrupted jobs and deletions left in the staging folder; how many entries."""
    staging = Path(cache_root) / STAGING_DIR
    if not staging.is_dir():
        return 0
    entries = list(staging.iterdir())
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if entries:
        log.warning("removed %d unfinished avatar preparations", len(entries))
    return len(entries)


def upload_name(filename: str | None) -> str:
    """A safe file name for an upload (the manifest's source name), its suffix checked.

    Raises :class:`VideoError` (422) for a suffix outside the video and image whitelist.
    """
    original = Path(filename or "").name
    suffix = Path(original).suffix.lower()
    if suffix not in VIDEO_SUFFIXES | UPLOAD_IMAGE_SUFFIXES:
        raise VideoError(f"an avatar source must be a video or a photo, not {suffix or 'a file without suffix'!r}",
                         hint=VIDEO_FORMATS_HINT)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(original).stem)[:56].strip("._")
    return f"{stem or 'source'}{suffix}"


def default_avatar_id(source_name: str) -> str:
    """An avatar id from a file name (its stem), or a generated one when the stem is no valid id."""
    stem = Path(source_name).stem[:56]
    try:
        return safe_name(stem, "avatar_id")
    except ValueError:
        return f"avatar-{uuid.uuid4().hex[:8]}"


class AvatarJobs:
    """Queue, run and report avatar preparation jobs for one library.

    ``encoder`` and ``vae_id`` fill latents in this process (``None`` for the
    lite renderer, which needs none).
    """

    def __init__(self, settings: Settings, library: AvatarLibrary, encoder: Encoder | None, vae_id: str | None,
                 *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.library = library
        self.encoder = encoder
        self.vae_id = vae_id
        self.metrics = metrics
        self.staging = library.root / STAGING_DIR
        self._jobs: OrderedDict[str, PrepJob] = OrderedDict()  # by avatar id, newest last
        self._queue: queue.Queue[PrepJob | None] = queue.Queue()
        self._lock = threading.Lock()
        self._child: BaseProcess | None = None
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="avatar-prep", daemon=True)
        self._worker.start()

    def options(self, avatar_id: str, given: dict[str, Any]) -> AvatarSettings:
        """The avatar settings of a job: the server's, with ``given`` prep options; BadInput if invalid."""
        unknown = set(given) - set(PREP_OPTIONS)
        if unknown:
            raise BadInput(f"unknown prep options: {', '.join(sorted(unknown))}",
                           hint=f"known: {', '.join(PREP_OPTIONS)}")
        try:
            cfg = AvatarSettings.model_validate({**self.settings.avatar.model_dump(), **given,
                                                 "avatar_id": avatar_id})
        except ValueError as exc:
            errors = getattr(exc, "errors", lambda: [])()
            text = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or str(exc)
            raise BadInput(text) from None
        try:
            check_quantum(cfg.fps, self.settings.media.audio_rate, "an avatar")
        except MuseTalkWarmError as exc:
            raise BadInput(exc.message, hint=exc.hint) from None
        return cfg

    def create(self, avatar_id: str, source_name: str, options: dict[str, Any]) -> PrepJob:
        """Reserve ``avatar_id`` for a new job and make its staging folder (the upload goes to ``job.source``).

        Conflict for a taken or reserved id, TooManyRequests when too many jobs wait.
        """
        self.options(avatar_id, options)
        with self._lock:
            if self._closed:
                raise Conflict("the server is shutting down")
            if avatar_id == DEMO_AVATAR_ID or avatar_id in self.library.ids():
                raise Conflict(f"avatar {avatar_id!r} already exists",
                               hint="choose another avatar_id, or DELETE /avatars/{id} first")
            current = self._jobs.get(avatar_id)
            if current is not None and current.status in _ACTIVE:
                raise Conflict(f"avatar {avatar_id!r} is being prepared", hint=f"poll GET /avatars/{avatar_id}")
            if sum(job.status in _ACTIVE for job in self._jobs.values()) >= MAX_QUEUED:
                raise TooManyRequests(f"{MAX_QUEUED} avatars are already waiting to be prepared",
                                      hint="retry when one is ready", retry_after=10)
            job = PrepJob(uuid.uuid4().hex, avatar_id, source_name, options, self.staging / uuid.uuid4().hex)
            job.source.parent.mkdir(parents=True)
            self._jobs.pop(avatar_id, None)
            self._jobs[avatar_id] = job
            self._forget_finished()
        return job

    def start(self, job: PrepJob) -> None:
        """Queue a created job whose upload is in place."""
        self._queue.put(job)

    def abandon(self, job: PrepJob) -> None:
        """Drop a created job that will not start (its upload failed); nothing of it stays."""
        with self._lock:
            if self._jobs.get(job.avatar_id) is job:
                del self._jobs[job.avatar_id]
        shutil.rmtree(job.folder, ignore_errors=True)

    def get(self, avatar_id: str) -> PrepJob | None:
        """The newest job for ``avatar_id``."""
        with self._lock:
            return self._jobs.get(avatar_id)

    def unfinished(self) -> list[PrepJob]:
        """Jobs that are queued, preparing or failed (ready ones are listed as avatars)."""
        with self._lock:
            return [job for job in self._jobs.values() if job.status != "ready"]

    def delete(self, avatar_id: str) -> None:
        """Delete a prepared avatar or forget a failed job; Conflict while it is prepared or in use."""
        if avatar_id == DEMO_AVATAR_ID:
            raise Conflict("the built-in demo avatar cannot be deleted")
        job = self.get(avatar_id)
        if job is not None and job.status in _ACTIVE:
            raise Conflict(f"avatar {avatar_id!r} is being prepared", hint="delete it once it is ready or failed")
        try:
            self.library.remove(avatar_id)
        except NotFound:
            if job is None or job.status != "failed":
                raise
        with self._lock:
            if self._jobs.get(avatar_id) is job:
                self._jobs.pop(avatar_id, None)

    def close(self) -> None:
        """Stop: the running child is killed, queued jobs are dropped, staging folders removed."""
        with self._lock:
            self._closed = True
            child = self._child
        if child is not None and child.is_alive():
            child.kill()
        self._queue.put(None)
        self._worker.join(timeout=10)
        clean_staging(self.library.root)

    def _forget_finished(self) -> None:
        finished = [key for key, job in self._jobs.items() if job.status not in _ACTIVE]
        for key in finished[: max(0, len(finished) - _MAX_FINISHED)]:
            del self._jobs[key]

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            if not self._closed:
                self._run(job)

    def _run(self, job: PrepJob) -> None:
        started = time.perf_counter()
        job.status = "preparing"
        try:
            self._prepare(job)
            job.status = "ready"
        except MuseTalkWarmError as exc:
            job.status, job.error = "failed", exc.to_dict()
        except Exception:
            log.exception("avatar %s: preparation failed", job.avatar_id)
            job.status = "failed"
            job.error = {"error": "internal_error", "message": "the avatar could not be prepared; see the server log"}
        finally:
            shutil.rmtree(job.folder, ignore_errors=True)
            job.seconds = round(time.perf_counter() - started, 3)
            job.stage = None
        log.info("avatar %s: %s in %.1f s%s", job.avatar_id, job.status, job.seconds,
                 f" ({job.error['message']})" if job.error else "")
        if self.metrics is not None:
            self.metrics.avatar_preps.labels(job.status).inc()
            self.metrics.avatar_prep_seconds.observe(job.seconds)

    def _prepare(self, job: PrepJob) -> None:
        cfg = self.options(job.avatar_id, job.options).model_copy(
            update={"video_path": job.source, "cache_dir": job.folder, "preparation": True})
        settings = self.settings.model_copy(update={"avatar": cfg})
        self._in_child(job, settings)
        avatar = load_avatar(job.avatar_id, job.folder)
        if self.encoder is not None:
            job.stage, job.frames_done = "latents", 0
            encoder = self.encoder

            def counted(crops: np.ndarray) -> np.ndarray:
                latents = encoder(crops)
                job.frames_done += len(crops)
                return latents

            latents = encode_crops(counted, avatar.crops, self.settings.render.batch_size)
            avatar = replace(avatar, latents=latents,
                             manifest={**avatar.manifest, "vae_id": self.vae_id, "has_latents": True})
            save_latents(avatar, job.folder)
        self.library.check(avatar)
        try:
            (job.folder / job.avatar_id).rename(self.library.root / job.avatar_id)
        except OSError:  # the id was taken meanwhile (a CLI prep): the folder there is not empty
            raise Conflict(f"avatar {job.avatar_id!r} already exists") from None
        self.library.add(avatar)  # loaded (and checked) already: its first use need not decode it again

    def _in_child(self, job: PrepJob, settings: Settings) -> None:
        """Run the CPU part of preparation in a child; its progress lines update ``job``."""
        child, receive = start_child(_child, settings.model_dump_json())
        with self._lock:
            self._child = child
            if self._closed:  # close() ran meanwhile and could not see this child
                child.kill()
        result: dict[str, Any] | None = None
        try:
            while result is None:
                if not receive.poll(PREP_TIMEOUT_S):
                    raise VideoError(f"preparing {job.source_name} made no progress for {PREP_TIMEOUT_S:g} s")
                message = json.loads(receive.recv_bytes())
                if "stage" in message:
                    job.stage, job.frames_done = message["stage"], message["done"]
                    job.frames_total = message["total"] or None
                else:
                    result = message
        except EOFError:
            pass
        finally:
            end_child(child, receive)
            with self._lock:
                self._child = None
        if result is None:
            if self._closed:
                raise Conflict("the server shut down while the avatar was prepared")
            raise VideoError(f"{job.source_name} cannot be prepared (the preparing process ended by "
                             f"{exit_reason(child.exitcode)})")
        if "error" in result:
            error = result["error"]
            raise _error_class(error["error"])(error["message"], hint=error.get("hint"))


def _error_class(code: str) -> type[MuseTalkWarmError]:
    """The error type with this code (the child sends errors as JSON, never pickled)."""
    found: list[type[MuseTalkWarmError]] = [MuseTalkWarmError]
    while found:
        cls = found.pop()
        if cls.code == code:
            return cls
        found.extend(cls.__subclasses__())
    return MuseTalkWarmError


def _child(send: Connection, settings_json: str) -> None:
    """Prepare the avatar the settings describe, without latents; reports as JSON lines."""
    last, last_stage = 0.0, ""

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal last, last_stage
        now = time.monotonic()
        if stage != last_stage or done == total or now - last > 0.2:
            last, last_stage = now, stage
            send.send_bytes(json.dumps({"stage": stage, "done": done, "total": total}).encode())

    try:
        settings = Settings.model_validate_json(settings_json)
        _check_source(settings)
        from .prep import prepare_avatar

        progress("reading", 0, 0)
        prepare_avatar(settings, force=True, progress=False, on_progress=progress)
        send.send_bytes(b'{"ok": true}')
    except MediaError as exc:  # a video that stops decoding midway: the upload's fault
        _send_error(send, VideoError(exc.message, hint=exc.hint))
    except MuseTalkWarmError as exc:
        _send_error(send, exc)
    except Exception as exc:  # noqa: BLE001 - any other failure is still the upload's
        _send_error(send, VideoError(f"the avatar source cannot be prepared ({type(exc).__name__})"))
    finally:
        send.close()


def _send_error(send: Connection, exc: MuseTalkWarmError) -> None:
    send.send_bytes(json.dumps({"error": exc.to_dict()}).encode())


def _check_source(settings: Settings) -> None:
    """VideoError for a video that is not in the whitelist, too long or too large, or a photo that is not one."""
    cfg = settings.avatar
    assert cfg.video_path is not None
    path = Path(cfg.video_path)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        check_video_upload(path, cfg.max_upload_seconds)
        return
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise VideoError(f"{path.name} is not an image in a supported format", hint=VIDEO_FORMATS_HINT)
    height, width = image.shape[:2]
    if width * height > MAX_VIDEO_PIXELS:
        raise VideoError(f"{path.name} is {width}x{height}; the largest photo accepted is 1920x1080 pixels",
                         hint="scale the photo down")
