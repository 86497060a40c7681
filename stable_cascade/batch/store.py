"""The output folder of a batch run: images written atomically, the run's settings, and its manifest.

``OUT/`` holds the images (see :attr:`PlannedItem.files <stable_cascade.batch.plan.PlannedItem.files>`),
``batch.json`` (the settings and base seed every rerun must share), ``manifest.jsonl`` (one line per
image: item, image, where, prompt, seed, file, sha256 and the record the PNG carries), ``summary.json``
and, while a run is going, ``.journal/`` (what each process has written, read into the manifest at the
end) and ``.batch.lock`` (held by the run's main process, so two runs never write one folder). Every
file is written to a temporary name and renamed, so a killed run leaves no partial file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import PIL.Image

from stable_cascade.engine import ImageRecord, Job, atomic, read_png, save_png, sha256_file

logger = logging.getLogger(__name__)
SETTINGS = "batch.json"
MANIFEST = "manifest.jsonl"
SUMMARY = "summary.json"
JOURNALS = ".journal"
LOCK = ".batch.lock"
_EARLIER_TEMPORARY = re.compile(r"^\..+\.\d+\.tmp$")


def check_batch_folder(folder: Path) -> None:
    """A ``ValueError`` when ``folder`` holds files but is no batch output (it has no ``batch.json``):
    a run would replace the files it names as its own and overwrite others' ``manifest.jsonl``. Hidden
    files (``.DS_Store``, a killed first run's lock) do not count: a run touches none but its own."""
    if not folder.is_dir() or (folder / SETTINGS).is_file():
        return
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if names:
        raise ValueError(
            f"{folder} holds files ({names[0]}{', …' if len(names) > 1 else ''}) but is not a batch output "
            f"(it has no {SETTINGS}); choose a new or empty folder for -o"
        )


def check_writable(folder: Path) -> None:
    """Make ``folder`` and write a file in it, or raise a ``ValueError`` saying why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = atomic.temporary_name(folder / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise ValueError(
            f"cannot write into the output folder {folder} ({reason}); choose another -o"
        ) from None


@contextlib.contextmanager
def run_lock(folder: Path, hold: bool) -> Iterator[str | None]:
    """Hold ``folder``'s lock while the block runs (when ``hold``: the main process); yields the error
    line to raise when another run holds it. The operating system drops the lock when its process
    ends, however it ends, so a killed run never blocks its rerun. Without ``fcntl`` (Windows) no lock."""
    try:
        import fcntl
    except ImportError:
        hold = False
    if not hold:
        yield None
        return
    with (folder / LOCK).open("a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield (
                f"another batch run is writing into {folder}; wait for it to finish (its images are "
                "kept and a rerun skips them) or choose another -o"
            )
            return
        try:
            yield None
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def write_text(path: Path, text: str) -> None:
    atomic.write_text(path, text)


def write_image(path: Path, image: PIL.Image.Image, record: ImageRecord) -> str:
    """Save ``image`` with ``record`` at ``path`` atomically; the file's sha256."""
    save_png(image, path, record)
    return sha256_file(path)


def remove_temporaries(folder: Path) -> None:
    """Delete what killed runs left half written (``.NAME.<12 hex>.tmp``; ``.NAME.<pid>.tmp`` from
    earlier versions), and no other file."""
    for path in folder.iterdir():
        if atomic.is_temporary(path.name) or _EARLIER_TEMPORARY.match(path.name):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def check_settings(
    folder: Path, settings: Mapping[str, Any], seed: int | None
) -> tuple[int | None, str | None]:
    """The stored base seed (None if no run stored one) and an error when ``settings`` differ."""
    path = folder / SETTINGS
    if not path.is_file():
        return None, None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        old, old_seed = stored["settings"], stored["seed"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        return None, f"{path} is not a batch run's settings ({error}); remove it or choose another -o"
    if seed is not None and seed != old_seed:
        return (
            old_seed,
            f"{folder} was made with --seed {old_seed}, not {seed}; rerun with it or choose another -o",
        )
    try:
        old = _current_form(old, path)
    except ValueError as error:
        return old_seed, f"{error}; remove it or choose another -o"
    difference = first_difference(old, settings)
    if difference:
        return old_seed, (
            f"{folder} was made with other settings ({difference}; see {path}); rerun with the same "
            "settings or choose another -o"
        )
    return old_seed, None


def _current_form(settings: Any, path: Path) -> Any:
    """Settings an earlier version stored (stages, models and controls nested) as this version's."""
    nested = isinstance(settings, Mapping) and any(
        isinstance(settings.get(key), Mapping) for key in ("prior", "decoder", "models")
    )
    if not nested:
        return settings
    data = Job.from_dict({**settings, "seed": 0}, str(path)).to_dict()
    return json.loads(json.dumps({k: v for k, v in data.items() if k != "seed"}))


def first_difference(old: Any, new: Any, key: str = "") -> str | None:
    """``"prior.steps is 4 there, 5 now"`` for the first value that differs, None when none does."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for name in sorted(set(old) | set(new), key=str):
            found = first_difference(old.get(name), new.get(name), f"{key}.{name}" if key else str(name))
            if found:
                return found
        return None
    return None if old == new else f"{key or 'the value'} is {old!r} there, {new!r} now"


def store_settings(folder: Path, settings: Mapping[str, Any], seed: int, prompts: str) -> None:
    data = {"settings": dict(settings), "seed": seed, "prompts": prompts}
    write_text(folder / SETTINGS, json.dumps(data, indent=1, sort_keys=True) + "\n")


def image_state(path: Path, job: Job, index: int, digest: object = None) -> str | None:
    """``"done"`` when ``path`` holds image ``index`` of ``job``, None when there is no usable file (or
    it does not match ``digest``, the sha256 its manifest line records), else how it differs."""
    if not path.is_file():
        return None
    if digest is not None and sha256_file(path) != digest:
        logger.warning("%s is not the file its manifest line records (sha256); it will be made again", path)
        return None
    try:
        record = read_png(path)
    except (ValueError, OSError) as error:
        logger.warning("%s is unreadable (%s); it will be made again", path, error)
        return None
    if record.job == job and record.index == index:
        return "done"
    return (
        first_difference({**record.job.to_dict(), "index": record.index}, {**job.to_dict(), "index": index})
        or "the record differs"
    )


class Journal:
    """The lines this process adds to the manifest, appended as each image is written."""

    def __init__(self, folder: Path, run: str, rank: int) -> None:
        (folder / JOURNALS).mkdir(exist_ok=True)
        self._file = (folder / JOURNALS / f"{run}-{rank}.jsonl").open("a", encoding="utf-8")

    def add(self, entry: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(entry, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def entry(item: int, image: int, where: str, file: str, digest: str, record: ImageRecord) -> dict[str, Any]:
    """One manifest line."""
    return {
        "item": item,
        "image": image,
        "where": where,
        "prompt": record.job.prompt,
        "seed": record.seed,
        "file": file,
        "sha256": digest,
        "record": record.to_dict(),
    }


def read_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """Manifest and journal lines by file name (the latest wins; a line cut short by a kill is skipped)."""
    entries: dict[str, dict[str, Any]] = {}
    for path in [folder / MANIFEST, *sorted((folder / JOURNALS).glob("*.jsonl"))]:
        for line in _lines(path):
            try:
                data = json.loads(line)
                entries[data["file"]] = data
            except (ValueError, KeyError, TypeError, RecursionError):  # cut short, or not ours
                continue
    return entries


def _lines(path: Path) -> Iterator[str]:
    if path.is_file():
        yield from path.read_text(encoding="utf-8").splitlines()


def write_manifest(folder: Path, entries: list[dict[str, Any]]) -> None:
    """``manifest.jsonl`` with ``entries`` (in item order), then the journals are no longer needed."""
    write_text(folder / MANIFEST, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    for path in (folder / JOURNALS).glob("*.jsonl"):
        path.unlink()
    with contextlib.suppress(OSError):
        (folder / JOURNALS).rmdir()


def write_summary(folder: Path, summary: Mapping[str, Any]) -> None:
    write_text(folder / SUMMARY, json.dumps(dict(summary), indent=1, sort_keys=True) + "\n")
