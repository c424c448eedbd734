"""Uploads and the training job behind the studio's "train from the browser".

An upload is a zip of images (class subfolders, or captions as metadata.jsonl / metadata.csv / sidecar
.txt files, as `folder:` data reads them), unpacked into its own folder under the server's work folder.
Nothing may land outside that folder, and nothing unbounded is unpacked: every member is checked before
a byte is written (no absolute paths, no `..`, no drive letters, no links), and the number of members,
each member's size, the total size and each member's compression ratio (zip bombs) have limits. Only
image and caption files are kept; the images are decoded later, by the same decoder and limits as any
`folder:` data, when training reads them (a bad image is reported and skipped there).

Uploads are content-addressed: an upload's id is the start of its zip's SHA-256, so the same zip sent
twice (the page sends it on every Train click) is stored once. A zip is unpacked into a hidden partial
folder and renamed into place when whole, so an unpack that outlives its request leaves a complete,
addressable upload or nothing. Only the newest KEEP_UPLOADS uploads and KEEP_LOGS logs are kept (never
the upload a job is training on), and a new upload is refused (507) while the studio folder is over
MAX_STUDIO_BYTES or the disk has less than MIN_FREE_BYTES free. Trained runs are the user's: they stay.

One training job at a time runs as its own process (`python -m imagegen train ...`), so a crash in it
cannot take the server down; its progress is the run folder's log.jsonl, and cancelling it kills the
process group. It runs at a lower priority (nice JOB_NICE) on all cores but one, under a memory cap, so
the server stays responsive; it is killed GRACE_S after its time budget if it has not stopped by then,
when the server stops, and (on Linux) when the server's process dies. The server's routes (training.py)
only call this module.

A latent job (flow or ddpm on colour images of 64 px and more) is one process too (serve/chain.py): an
autoencoder (`ae`) for AE_SHARE of the minutes, written under the work folder's autoencoders/, then the
model on its latents for the rest, written with the other runs; its status says which stage runs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..checkpoint import run_folders
from ..data.folder import ALLOWED_SUFFIXES, CAPTION_SUFFIXES
from ..errors import ImagegenError
from ..files import sha256_file, write_json_atomic
from ..models import REGISTRY
from ..requests import TrainRequest

MAX_ZIP_BYTES = 64 << 20          # the uploaded zip itself
MAX_MEMBERS = 5000                # files in it
MAX_MEMBER_BYTES = 16 << 20       # one unpacked file
MAX_TOTAL_BYTES = 256 << 20       # all unpacked files together
MAX_DEPTH = 16                    # folders above a member
MAX_NAME = 100                    # characters of one file or folder name
MAX_RATIO = 100                   # unpacked / packed size of one member (a zip bomb goes far beyond)
KEPT_SUFFIXES = ALLOWED_SUFFIXES | set(CAPTION_SUFFIXES) | {".jsonl", ".csv"}
TRAIN_FAMILIES = tuple(name for name, cls in REGISTRY.items() if cls.trains_in_studio)
LATENT_FAMILIES = tuple(name for name in TRAIN_FAMILIES if REGISTRY[name].learns_latents)
AE_SHARE = 1 / 3                  # a latent job's autoencoder: this share of its minutes (the model the rest)
MAX_TRAIN_MINUTES = 120.0
GRID_EVERY = 100                  # steps between the job's sample grids, so that they arrive while it runs
MAX_STUDIO_BYTES = 4 << 30        # the studio folder (uploads, logs, runs): new uploads are refused past it
MIN_FREE_BYTES = 1 << 30          # the free disk a new upload must leave
KEEP_UPLOADS = 8                  # the newest uploads kept (and the one a job trains on)
KEEP_LOGS = 8                     # the newest job logs kept
GRACE_S = 60.0                    # a job still running this long after its budget is killed
JOB_NICE = 10                     # the job's priority below the server's
JOB_MEMORY_FRACTION = 0.5         # the job's address space: this share of the machine's memory (at least 4 GiB)


class UploadError(ImagegenError):
    """An upload refused: what was wrong, naming the member."""


def _safe_member(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The member's relative path if it is a plain file that may be unpacked; None for folders and files
    that are not images or captions (skipped); UploadError for anything that could escape."""
    name = info.filename
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UploadError(f"zip member {name!r}: absolute or Windows-style path")
    path = PurePosixPath(name)
    if ".." in path.parts:
        raise UploadError(f"zip member {name[:100]!r}: a path with '..' leaves the upload folder")
    if len(path.parts) > MAX_DEPTH or any(len(part) > MAX_NAME for part in path.parts):
        raise UploadError(f"zip member {name[:100]!r}: more than {MAX_DEPTH} folders deep or a name over "
                          f"{MAX_NAME} characters")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UploadError(f"zip member {name!r}: a symbolic link")
    if info.is_dir():
        return None
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):   # 0: written without a file type (zipfile.writestr, Windows)
        raise UploadError(f"zip member {name!r}: not a regular file")
    if any(part.startswith(".") for part in path.parts) or path.suffix.lower() not in KEPT_SUFFIXES:
        return None
    return path


def unpack_upload(zip_path: Path, dest: Path) -> dict:
    """Check every member of the zip at zip_path, then unpack the image and caption files into dest (a new
    folder). Returns {"images": n, "captions": n, "skipped": n}. UploadError (nothing written) on any
    unsafe member or limit; a member whose unpacked bytes exceed its declared size is caught while
    writing, and dest is removed."""
    try:
        z = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UploadError(f"not a zip file ({e})") from None
    with z:
        infos = z.infolist()
        if len(infos) > MAX_MEMBERS:
            raise UploadError(f"{len(infos)} files in the zip; at most {MAX_MEMBERS}")
        plan, total, skipped = [], 0, 0
        for info in infos:
            path = _safe_member(info)
            if path is None:
                skipped += not info.is_dir()
                continue
            if info.file_size > MAX_MEMBER_BYTES:
                raise UploadError(f"zip member {info.filename!r}: {info.file_size} bytes; at most {MAX_MEMBER_BYTES}")
            if info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise UploadError(f"zip member {info.filename!r}: compressed {info.file_size / max(info.compress_size, 1):.0f}:1; "
                                  f"at most {MAX_RATIO}:1 (a zip bomb?)")
            total += info.file_size
            if total > MAX_TOTAL_BYTES:
                raise UploadError(f"the zip unpacks to over {MAX_TOTAL_BYTES} bytes")
            plan.append((info, path))
        if not any(p.suffix.lower() in ALLOWED_SUFFIXES for _, p in plan):
            raise UploadError(f"no images in the zip ({', '.join(sorted(ALLOWED_SUFFIXES))})")
        names = [str(p).lower() for _, p in plan]
        if len(set(names)) < len(names):   # also "A.png" beside "a.png": one file on case-insensitive disks
            raise UploadError("the zip holds two members with the same name")
        folders = {str(parent).lower() for _, p in plan for parent in p.parents}
        if clash := sorted(folders & set(names)):   # "a.png" and "a.png/b.png": a file and a folder at once
            raise UploadError(f"zip member {clash[0][:100]!r} is both a file and a folder")
        dest.mkdir(parents=True)
        root = dest.resolve()
        try:
            for info, path in plan:
                target = (root / path).resolve()
                if not target.is_relative_to(root):    # checked above; this holds whatever the path says
                    raise UploadError(f"zip member {info.filename!r} leaves the upload folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "xb") as out:
                    written = 0
                    while block := src.read(1 << 20):
                        written += len(block)
                        if written > info.file_size:   # the header lied about the size
                            raise UploadError(f"zip member {info.filename!r} is larger than it says")
                        out.write(block)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:   # a damaged or odd member
            shutil.rmtree(dest, ignore_errors=True)
            raise UploadError(f"cannot unpack the zip: {e}") from None
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    images = sum(p.suffix.lower() in ALLOWED_SUFFIXES for _, p in plan)
    return {"images": images, "captions": len(plan) - images, "skipped": skipped}


class StudioFull(UploadError):
    """The studio folder or the disk is over its cap: 507, nothing stored."""


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) if folder.is_dir() else 0


def check_room(work: Path) -> None:
    """StudioFull when the studio folder is over MAX_STUDIO_BYTES or the disk under it has less than
    MIN_FREE_BYTES free."""
    used = folder_bytes(work)
    if used > MAX_STUDIO_BYTES:
        raise StudioFull(f"the studio folder holds {used >> 20} MiB, over its cap of {MAX_STUDIO_BYTES >> 20} MiB: "
                         f"remove old runs under {work.name}/runs")
    probe = work if work.is_dir() else work.parent
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE_BYTES:
        raise StudioFull(f"{free >> 20} MiB free on the disk, under the {MIN_FREE_BYTES >> 20} MiB an upload must leave")


def upload_id(zip_path: Path) -> str:
    """An upload's id: the first 16 hex digits of its zip's SHA-256 (the same zip, the same id)."""
    return sha256_file(zip_path)[:16]


def store_upload(zip_path: Path, uploads: Path, keep: set[str] = frozenset()) -> dict:
    """The zip at zip_path, unpacked (unpack_upload) into uploads/ID, ID = upload_id; a zip stored before is
    reused, not unpacked again. Then only the newest KEEP_UPLOADS uploads stay, and those in `keep` (a
    job's). Returns {"upload": ID, "images", "captions", "skipped", "reused"}."""
    upload = upload_id(zip_path)
    final, counts_file = uploads / upload, uploads / f"{upload}.json"
    if final.is_dir() and counts_file.is_file():
        os.utime(final)                                   # used again: the newest
        return {"upload": upload, **json.loads(counts_file.read_text()), "reused": True}
    check_room(uploads.parent)
    partial = uploads / f".partial-{upload}-{secrets.token_hex(4)}"
    uploads.mkdir(parents=True, exist_ok=True)
    counts = unpack_upload(zip_path, partial)             # removes `partial` itself on any failure
    try:
        shutil.rmtree(final, ignore_errors=True)          # a folder without its counts: an earlier crash
        os.replace(partial, final)
        write_json_atomic(counts_file, counts)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    prune(uploads, KEEP_UPLOADS, keep | {upload})
    return {"upload": upload, **counts, "reused": False}


def prune(folder: Path, keep_newest: int, keep: set[str] = frozenset()) -> None:
    """Remove all but the newest `keep_newest` entries of folder (uploads with their counts file, or log
    files) and those named in `keep`; hidden partial folders are left to clear_partials."""
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix != ".json"),
                     key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    for old in entries[keep_newest:]:
        if old.stem in keep or old.name in keep:
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
        (folder / f"{old.name}.json").unlink(missing_ok=True)


def clear_partials(uploads: Path) -> None:
    """Partial unpacks a stopped server left behind (start-up: no unpack runs yet)."""
    for partial in uploads.glob(".partial-*") if uploads.is_dir() else []:
        shutil.rmtree(partial, ignore_errors=True)


@dataclass
class TrainJob:
    """One training process and where it writes."""
    upload: str
    family: str
    minutes: float
    out: Path
    process: subprocess.Popen
    log: Path
    before: frozenset = frozenset()   # the folders in `out` when the job started: earlier jobs' runs
    first_out: Path | None = None     # a latent job's autoencoder folder (its first stage), else None
    started: float = field(default_factory=time.time)
    cancelled: bool = False
    killed: bool = False              # by the watchdog, past its budget and grace
    _run: Path | None = None
    _watchdog: threading.Timer | None = None

    def watch(self, limit_s: float) -> None:
        """Kill the job if it still runs limit_s from now (its own time limit should have ended it)."""
        self._watchdog = threading.Timer(limit_s, self.overdue)
        self._watchdog.daemon = True
        self._watchdog.start()

    def overdue(self) -> None:
        if self.process.poll() is None:
            self.killed = True
            self.stop()

    def run_dir(self) -> Path | None:
        """The run folder this job writes: the one new folder in `out` with a config.json, once it exists
        (earlier jobs' runs share `out`), then remembered."""
        if self._run is None and self.out.is_dir():
            new = sorted(p for p in self.out.iterdir() if p.name not in self.before and (p / "config.json").is_file())
            self._run = new[-1] if new else None
        return self._run

    def working_dir(self) -> Path | None:
        """The run folder being written: the model's, or in a latent job before it exists the autoencoder's."""
        run = self.run_dir()
        if run is not None or self.first_out is None:
            return run
        return next((p for p in run_folders(self.first_out) if (p / "config.json").is_file()), None)

    def status(self) -> dict:
        code = self.process.poll()
        state = "running" if code is None else "cancelled" if self.cancelled else "done" if code == 0 else "failed"
        if self.killed and code is not None:
            state = "failed"
        run, working = self.run_dir(), self.working_dir()
        last = {}
        if working is not None and (working / "log.jsonl").is_file():
            lines = (working / "log.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
            for line in reversed(lines):
                try:
                    last = json.loads(line)
                    break
                except ValueError:
                    continue
        error = ""
        if self.killed:
            error = f"killed: still running {GRACE_S:g} s after its {self.minutes:g}-minute budget"
        elif state == "failed":   # the process's last lines say why (a typed error is one line)
            tail = self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:] if self.log.is_file() else []
            error = " ".join(tail)[-500:] or f"the training process exited with status {code}"
        grid = self.latest_grid()
        return {"state": state, "family": self.family, "minutes": self.minutes, "upload": self.upload,
                "stage": None if self.first_out is None else "model" if run is not None else "autoencoder",
                "seconds": round(time.time() - self.started, 1), "step": last.get("step", 0),
                "loss": {k: v for k, v in last.items() if k not in ("step", "images_per_s", "bad_steps")},
                "run": run.name if run is not None else None, "error": error,
                "grid_step": int(grid.stem.split("-")[1]) if grid is not None else None}

    def latest_grid(self) -> Path | None:
        """The newest sample grid the job has written (samples/step-NNNNNNN.png; in a latent job's first
        stage the autoencoder's reconstructions), if any."""
        run = self.working_dir()
        grids = sorted((run / "samples").glob("step-*.png")) if run is not None else []
        return grids[-1] if grids else None

    def cancel(self) -> None:
        if self.process.poll() is None:
            self.cancelled = True
            self.stop()

    def stop(self, wait_s: float = 3.0) -> None:
        """End the process group: SIGTERM, then SIGKILL if it has not gone within wait_s."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            self.process.wait()


def start_training(upload_dir: Path, upload: str, family: str, minutes: float, out: Path, logs: Path,
                   overrides: dict | None = None, *, latent: bool = False) -> TrainJob:
    """The training process for an unpacked upload: `imagegen train --data folder:DIR --model F` with a
    time limit, into `out` (a folder the server serves runs from), its output in `logs`. `latent`: an
    autoencoder first, into out's sibling autoencoders/, and the model on its latents (serve/chain.py)."""
    if family not in TRAIN_FAMILIES:
        raise UploadError(f"family {family!r}: one of {', '.join(TRAIN_FAMILIES)}")
    if latent and family not in LATENT_FAMILIES:
        raise UploadError(f"family {family!r} does not train on latents; one of {', '.join(LATENT_FAMILIES)} does")
    out.mkdir(parents=True, exist_ok=True)
    before = frozenset(p.name for p in out.iterdir())
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"train-{upload}-{int(time.time())}.log"
    threads = max(1, (os.cpu_count() or 2) - 1)          # one core stays the server's

    def command(model: str, seconds: float, into: Path, sets: list[str]) -> list[str]:
        """`-m imagegen train ...` on the upload: an unknown key or a bad value is refused here, before a
        process starts."""
        ask = TrainRequest(model=model, data=f"folder:{upload_dir}",
                           sets=[f"train.time_limit={seconds:g}", f"train.sample_every={GRID_EVERY}",
                                 f"train.threads={threads}", *sets])
        ask.check()
        return ["-m", *ask.command(into), "--no-progress"]

    cmd = [sys.executable, *command(family, 60 * minutes, out, [f"{k}={v}" for k, v in (overrides or {}).items()])]
    first_out = None
    if latent:   # the model's config is checked as pixels: its autoencoder does not exist yet
        first_out = out.parent / "autoencoders" / log.stem.removeprefix("train-")
        spec = {"first": command("ae", 60 * minutes * AE_SHARE, first_out, []), "first_out": str(first_out),
                "then": cmd[1:], "seconds": 60 * minutes}
        cmd = [sys.executable, "-m", "imagegen.serve.chain", json.dumps(spec)]
    job = launch(cmd, log, upload, family, minutes, out, before, first_out)
    prune(logs, KEEP_LOGS, {log.name})
    return job


def launch(cmd: list[str], log: Path, upload: str, family: str, minutes: float, out: Path,
           before: frozenset = frozenset(), first_out: Path | None = None) -> TrainJob:
    """The job's process: its own session (so that cancelling ends its whole group), started through
    LIMITED (a lower priority, an address-space cap, and on Linux SIGTERM when the server's process dies),
    and watched: killed GRACE_S after its budget."""
    limits = [str(JOB_NICE), str(job_memory_bytes()), str(os.getpid())]
    with open(log, "wb") as f:
        process = subprocess.Popen([sys.executable, "-c", LIMITED, *limits, *cmd], stdout=f, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    job = TrainJob(upload, family, minutes, out, process, log, before, first_out)
    job.watch(60 * minutes + GRACE_S)
    return job


def job_memory_bytes() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return max(4 << 30, int(total * JOB_MEMORY_FRACTION))


# The job's first moments, in a bare interpreter (no imports of ours, so it starts at once): its limits,
# then exec of the real command in the same process. Done there rather than in a preexec_fn, which is
# unsafe in a process with threads (the server has several). PR_SET_PDEATHSIG (Linux) sends SIGTERM when
# the server's process dies; a server that died before it was set is caught by the parent-pid check.
LIMITED = """import ctypes, os, resource, signal, sys
nice, cap, server = (int(a) for a in sys.argv[1:4])
os.nice(nice)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    if os.getppid() != server:
        sys.exit("the server that started this job has gone")
os.execv(sys.argv[4], sys.argv[4:])
"""
