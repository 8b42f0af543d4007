"""Fetch the official weights into the upstream layout under ``--models-dir``.

Hugging Face files come through ``hf_hub_download`` (which resumes); the others
over HTTPS into ``<name>.part`` with a Range header, so an interrupted download
resumes too. Files already present with the expected size are skipped; after a
download every size (and SHA-256 where pinned) is checked. Prints a JSON summary
and exits 1 when any file failed.

    .venv/bin/python scripts/download_weights.py                  # MuseTalk + face prep weights
    .venv/bin/python scripts/download_weights.py --only core      # UNet, VAE, Whisper only
    .venv/bin/python scripts/download_weights.py --with-enhance   # also GFPGANv1.4.pth
    .venv/bin/python scripts/download_weights.py --with-syncnet   # also LatentSync's SyncNet (for `score`)
    .venv/bin/python scripts/download_weights.py --with-face-alignment  # S3FD + 2DFAN4 (face_backend: face_alignment)
    .venv/bin/python scripts/download_weights.py --dry-run        # list what would be fetched
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Group = Literal["core", "face", "enhance", "syncnet", "face_alignment"]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightFile:
    """One official file: where it goes and where it comes from."""

    path: str  # relative to the models folder, upstream layout
    group: Group
    size: int | None  # bytes; None for small configs that upstream may edit
    repo_id: str | None = None  # Hugging Face repository ...
    filename: str | None = None  # ... and the file's path inside it
    revision: str | None = None
    url: str | None = None  # or a plain HTTPS URL
    sha256: str | None = None  # pinned for files not fetched from their publisher's hub repo

    @property
    def source(self) -> str:
        return self.url or f"hf://{self.repo_id}/{self.filename}"


FILES: tuple[WeightFile, ...] = (
    WeightFile("musetalkV15/musetalk.json", "core", None, "TMElyralab/MuseTalk", "musetalkV15/musetalk.json"),
    WeightFile("musetalkV15/unet.pth", "core", 3_400_074_924, "TMElyralab/MuseTalk", "musetalkV15/unet.pth"),
    WeightFile("sd-vae/config.json", "core", None, "stabilityai/sd-vae-ft-mse", "config.json"),
    WeightFile(
        "sd-vae/diffusion_pytorch_model.safetensors",
        "core",
        334_643_276,
        "stabilityai/sd-vae-ft-mse",
        "diffusion_pytorch_model.safetensors",
    ),
    WeightFile("whisper/config.json", "core", None, "openai/whisper-tiny", "config.json"),
    WeightFile("whisper/pytorch_model.bin", "core", 151_095_027, "openai/whisper-tiny", "pytorch_model.bin"),
    WeightFile(
        "whisper/preprocessor_config.json", "core", None, "openai/whisper-tiny", "preprocessor_config.json"
    ),
    WeightFile("dwpose/dw-ll_ucoco_384.pth", "face", 406_878_486, "yzd-v/DWPose", "dw-ll_ucoco_384.pth"),
    # Upstream fetches this from Google Drive (face-parsing.PyTorch); this Hub copy is
    # byte-identical, which the pinned SHA-256 enforces.
    WeightFile(
        "face-parse-bisent/79999_iter.pth",
        "face",
        53_289_463,
        "ManyOtherFunctions/face-parse-bisent",
        "79999_iter.pth",
        revision="0073b233a5a3c4b1377d4dbf49245017938a72b5",
        sha256="468e13ca13a9b43cc0881a9f99083a430e9c0a38abd935431d1c28ee94b26567",
    ),
    WeightFile(
        "face-parse-bisent/resnet18-5c106cde.pth",
        "face",
        46_827_520,
        url="https://download.pytorch.org/models/resnet18-5c106cde.pth",
        sha256="5c106cde386e87d4033832f2996f5493238eda96ccf559d1d62760c4de0613f8",
    ),
    WeightFile(
        "GFPGANv1.4.pth",
        "enhance",
        348_632_874,
        url="https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth",
        sha256="e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad",
    ),
    # The lip-sync scorer MuseTalk v1.5 was trained against (configs/training/syncnet.yaml).
    WeightFile("syncnet/latentsync_syncnet.pt", "syncnet", None, "ByteDance/LatentSync", "latentsync_syncnet.pt"),
    # face-alignment 1.5.0's own download URLs (avatar.face_backend: face_alignment).
    WeightFile("face-alignment/s3fd-619a316812.pth", "face_alignment", None,
               url="https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth"),
    WeightFile("face-alignment/2DFAN4-11f355bf06.pth.tar", "face_alignment", None,
               url="https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar"),
)


class DownloadError(Exception):
    """A fetched file is not the expected one."""


def select(
    only: Literal["core", "all"] = "all", with_enhance: bool = False, with_syncnet: bool = False,
    with_face_alignment: bool = False,
) -> list[WeightFile]:
    """The files to fetch: ``core`` (UNet, VAE, Whisper) or ``all`` (+ face prep), + GFPGAN / SyncNet /
    face-alignment on request."""
    groups: set[str] = {"core"} if only == "core" else {"core", "face"}
    for wanted, group in ((with_enhance, "enhance"), (with_syncnet, "syncnet"),
                          (with_face_alignment, "face_alignment")):
        if wanted:
            groups.add(group)
    return [item for item in FILES if item.group in groups]


def local_state(item: WeightFile, root: Path) -> Literal["present", "missing", "wrong_size"]:
    target = root / item.path
    if not target.is_file():
        return "missing"
    if item.size is not None and target.stat().st_size != item.size:
        return "wrong_size"
    return "present"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify(item: WeightFile, root: Path) -> None:
    """Raise :class:`DownloadError` (and drop the file) when size or pinned hash differ."""
    target = root / item.path
    problem = None
    if not target.is_file():
        problem = "not written"
    elif item.size is not None and target.stat().st_size != item.size:
        problem = f"size {target.stat().st_size} != expected {item.size}"
    elif item.sha256 is not None and _sha256(target) != item.sha256:
        problem = "SHA-256 differs from the pinned value"
    if problem:
        target.unlink(missing_ok=True)
        raise DownloadError(f"{item.path}: {problem}")


def fetch_hf(item: WeightFile, root: Path, force: bool = False) -> None:
    from huggingface_hub import hf_hub_download

    assert item.repo_id and item.filename
    # hf_hub_download writes local_dir/<filename>; strip the repo subfolder from our path.
    depth = len(Path(item.filename).parts)
    local_dir = root.joinpath(*Path(item.path).parts[:-depth])
    hf_hub_download(
        repo_id=item.repo_id,
        filename=item.filename,
        revision=item.revision,
        local_dir=local_dir,
        force_download=force,
    )


def fetch_url(item: WeightFile, root: Path, force: bool = False) -> None:
    """HTTPS download into ``<name>.part``, resumed with a Range header, then renamed.

    ``force`` drops any partial download first.
    """
    assert item.url
    target = root / item.path
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    if force:
        part.unlink(missing_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if item.size is not None and have > item.size:
        have = 0
    if item.size is None or have < item.size:
        headers = {"Range": f"bytes={have}-"} if have else {}
        request = urllib.request.Request(item.url, headers=headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            if response.status != 206:  # the server ignored the range: start over
                have = 0
            with part.open("ab" if have else "wb") as out:
                shutil.copyfileobj(response, out, _CHUNK)
    part.replace(target)


def fetch(item: WeightFile, root: Path, force: bool = False) -> None:
    (fetch_url if item.url else fetch_hf)(item, root, force)


Fetcher = Callable[[WeightFile, Path, bool], None]


def sync(
    root: Path, items: Sequence[WeightFile], *, dry_run: bool = False, fetcher: Fetcher = fetch
) -> list[dict]:
    """Fetch what is missing or the wrong size; one summary row per file."""
    rows = []
    for item in items:
        state = local_state(item, root)
        row: dict = {"path": item.path, "source": item.source, "bytes": item.size, "found": state}
        if state == "present":
            row["status"] = "present"
        elif dry_run:
            row["status"] = "would_fetch"
        else:
            try:
                fetcher(item, root, state == "wrong_size")
                verify(item, root)
                row["status"] = "downloaded"
            # Network and hub failures come in many types; each is reported, the rest continue.
            except Exception as exc:  # noqa: BLE001
                row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"),
                        help="where the weights go, in the upstream layout (default models)")
    parser.add_argument("--only", choices=("core", "all"), default="all",
                        help="core: UNet, VAE, Whisper; all (default): also the face-prep weights")
    parser.add_argument("--with-enhance", action="store_true", help="also fetch GFPGANv1.4.pth")
    parser.add_argument("--with-syncnet", action="store_true", help="also fetch LatentSync's latentsync_syncnet.pt")
    parser.add_argument("--with-face-alignment", action="store_true",
                        help="also fetch face-alignment's S3FD and 2DFAN4 checkpoints")
    parser.add_argument("--dry-run", action="store_true", help="list what would be fetched")
    args = parser.parse_args(argv)
    wanted = select(args.only, args.with_enhance, args.with_syncnet, args.with_face_alignment)
    rows = sync(args.models_dir, wanted, dry_run=args.dry_run)
    ok = all(row["status"] != "failed" for row in rows)
    summary = {"models_dir": str(args.models_dir), "dry_run": args.dry_run, "ok": ok, "files": rows}
    print(json.dumps(summary, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
