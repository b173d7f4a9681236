"""File handling shared by the datasets: locating, checksumming, downloading, explaining errors."""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from mach_lightning.data.registry import DataError

NETWORK_TIMEOUT_S = 2.0
DOWNLOAD_TIMEOUT_S = 60.0


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_key(paths: Sequence[Path]) -> tuple:
    """A cache key that changes when any of these files is replaced or rewritten."""
    return tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)


def network_reachable(url: str) -> bool:
    """Whether url's host accepts a TCP connection within ~2 s.

    The probe runs in a daemon thread that we stop waiting for, because name resolution ignores
    socket timeouts and can otherwise hang for minutes on a machine without network.
    """
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    reachable: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((parts.hostname, port), timeout=NETWORK_TIMEOUT_S):
                reachable.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(NETWORK_TIMEOUT_S + 0.5)
    return bool(reachable)


def download(url: str, destination: Path) -> None:
    """Fetch url into destination, through a .part file so a broken transfer leaves no file."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            with open(partial, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
    except (OSError, urllib.error.URLError) as err:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"Downloading {url} to {destination} failed ({err}). Check the network connection "
            f"and retry, or download the file yourself and put it at {destination}."
        ) from err
    partial.replace(destination)


def download_hint(download_enabled: bool, url: str) -> str:
    """The sentence on downloading for a missing-files error: why it did not happen, or how."""
    if download_enabled:
        return (
            f"They could not be downloaded from {url}: the server is not reachable from this "
            "machine, so download them elsewhere and copy them over."
        )
    return f"Set data.download=true on a machine with network access to fetch them from {url}."


def find_folder(candidates: Sequence[Path], filenames: Sequence[str]) -> Path | None:
    """The first candidate folder that holds all the files."""
    for folder in candidates:
        if all((folder / name).is_file() for name in filenames):
            return folder
    return None


def missing_files(candidates: Sequence[Path], filenames: Sequence[str]) -> tuple[Path, list[str]]:
    """The candidate folder holding the most of the files (the first on ties) and what it lacks."""
    best = max(candidates, key=lambda folder: sum((folder / n).is_file() for n in filenames))
    return best, [name for name in filenames if not (best / name).is_file()]


def missing_error(
    title: str, candidates: Sequence[Path], filenames: Sequence[str], how_to_get: str
) -> DataError:
    """A DataError naming the files that are missing and the folder they belong in."""
    folder, missing = missing_files(candidates, filenames)
    searched = ", ".join(str(c) for c in dict.fromkeys(candidates))
    return DataError(
        f"The {title} files {', '.join(missing)} are missing (searched: {searched}). "
        f"Put them into {folder}/ (or point data.root at the folder holding them). {how_to_get}"
    )


def corrupt_error(title: str, path: Path, reason: str, how_to_get: str) -> DataError:
    """A DataError naming the damaged file and saying to replace it."""
    return DataError(
        f"The {title} file {path} is corrupt or incomplete: {reason}. Delete {path.name} and "
        f"download it again, or replace it with a good copy. {how_to_get}"
    )
