"""``generate_batch``: every item's images in ``OUT/``, on one process or all a launcher started.

Order of work (each process): read the items and check them all, check that ``OUT/`` is writable and
that its stored settings (``batch.json``) are the run's, plan every item's job and the units, find
which units still have an image to make (each process looks at a share of them), and only then load
the models and make the units left, round by round: in round ``r`` process ``p`` makes the left unit
``r · processes + p``. The main process shows the progress over all images after each round and, at the
end, writes ``manifest.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from stable_cascade.batch import store
from stable_cascade.batch.distributed import Processes
from stable_cascade.batch.items import BatchItem, read_items
from stable_cascade.batch.plan import PlannedItem, Unit, plan_items, plan_units
from stable_cascade.batch.sampling import UnitRunner
from stable_cascade.engine import Engine, Job, read_png, sha256_file
from stable_cascade.fields.checks import MAX_BATCH_SIZE, check_int

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BatchSummary:
    """What a run did: ``images`` in ``OUT/`` (``generated`` now, ``skipped`` already there)."""

    output_dir: str
    images: int
    generated: int
    skipped: int
    seconds: float  # the whole run, from reading the items
    load_seconds: float
    generation_seconds: float  # making the units, after loading
    images_per_second: float  # generated / generation_seconds
    processes: int
    per_process: tuple[int, ...]  # images each process made
    batch_size: int
    texts_encoded: int  # distinct texts run through the text encoder, over all processes
    #: Each process's CPU threads: images are bit for bit those of another run with the same counts.
    threads: tuple[int, ...] = ()

    def line(self) -> str:
        speed = f"{self.images_per_second:.2f} images/s" if self.generated else "nothing left to make"
        return (
            f"{self.images} images in {self.output_dir} ({self.generated} made, {self.skipped} already "
            f"there) in {self.seconds:.1f} s: {speed} on {self.processes} process(es) "
            f"({', '.join(map(str, self.per_process))})"
        )


def generate_batch(
    items: Sequence[BatchItem] | str | Path,
    output_dir: str | Path,
    *,
    settings: Mapping[str, Any] | None = None,
    seed: int | None = None,
    batch_size: int = 1,
    device: str = "auto",
    offload: str = "none",
    progress: bool = True,
) -> BatchSummary:
    """Make the images of ``items`` (a PROMPTS file or :class:`BatchItem` s) in ``output_dir``.

    ``settings``: :meth:`Job.create <stable_cascade.engine.Job.create>`'s arguments every item starts
    from (no prompt or seed); ``seed``: the base seed (default: the one ``output_dir`` stores, else
    random); ``batch_size``: images per model call. Rerunning skips the images already made; other
    settings than ``output_dir`` stores raise a ``ValueError``, as does any bad item, before any model
    loads. Under ``torchrun`` / ``accelerate launch`` every process calls this with the same arguments.
    """
    start = time.perf_counter()
    check_int("batch size", batch_size, 1, MAX_BATCH_SIZE)
    processes = Processes()
    try:
        return _Run(processes, Path(output_dir), batch_size, start).run(
            items, dict(settings or {}), seed, device, offload, progress
        )
    finally:
        processes.close()


class _Run:
    def __init__(self, processes: Processes, folder: Path, batch_size: int, start: float) -> None:
        self.processes, self.folder, self.batch_size, self.start = processes, folder, batch_size, start
        self._recorded = Job()
        self._digests: dict[str, object] = {}  # file → the sha256 its manifest line records

    def expected(self, job: Job) -> Job:
        """``job`` as its images record it (the dtype it runs in, the LoRAs' sha256: the run's)."""
        recorded = {lora.path: lora for lora in self._recorded.loras}
        loras = tuple(recorded.get(lora.path, lora) for lora in job.loras)
        return dataclasses.replace(job, dtype=self._recorded.dtype, loras=loras)

    def run(
        self,
        items: Sequence[BatchItem] | str | Path,
        settings: dict[str, Any],
        seed: int | None,
        device: str,
        offload: str,
        progress: bool,
    ) -> BatchSummary:
        source = str(items) if isinstance(items, (str, Path)) else "items"
        items = read_items(items) if isinstance(items, (str, Path)) else list(items)
        if not items:
            raise ValueError("there are no items to make; give at least one prompt")
        self.processes.agree(_writable(self.folder))
        with store.run_lock(self.folder, self.processes.main) as busy:
            self.processes.agree(busy)
            base = Job.create(**{**settings, "seed": 0})
            stored = json.loads(json.dumps({k: v for k, v in base.to_dict().items() if k != "seed"}))
            base_seed = self._base_seed(stored, seed)
            planned = plan_items(items, settings, base_seed)
            units = plan_units(planned, self.batch_size)
            engine = Engine(device=self.processes.device(device), dtype="auto", offload=offload)
            self.processes.share_cpu()
            self._recorded = engine.record_job(base)
            left, skipped = self._left(units, planned)
            if self.processes.main:
                store.store_settings(self.folder, stored, base_seed, source)
                store.remove_temporaries(self.folder)
            total = sum(entry.job.count for entry in planned)
            bar = tqdm(
                total=total, initial=skipped, unit="image", disable=not (progress and self.processes.main)
            )
            with bar:
                summary = self._make(engine, base, planned, left, bar)
            summary = dataclasses.replace(summary, images=total, skipped=skipped)
            error = None
            if self.processes.main:
                missing = _write_manifest(self.folder, planned, self.expected)
                store.write_summary(self.folder, {**dataclasses.asdict(summary), "missing": missing})
                if missing:
                    error = f"{len(missing)} images are missing in {self.folder} ({missing[0]}, …); run again"
            self.processes.agree(error)  # the others wait until the manifest is written
            return summary

    def _make(
        self, engine: Engine, base: Job, planned: list[PlannedItem], left: list[Unit], bar: Any
    ) -> BatchSummary:
        """Load the models (when anything is left) and make this process's share of ``left``."""
        run_id = self.processes.broadcast(f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
        load_start = time.perf_counter()
        if left:
            engine.load(base.models, base.dtype)
        runner = UnitRunner(engine)
        generation_start = time.perf_counter()
        made = self._rounds(
            left, planned, runner, store.Journal(self.folder, run_id, self.processes.rank), bar
        )
        generation = time.perf_counter() - generation_start
        per_process = tuple(self.processes.gather(made))
        return BatchSummary(
            output_dir=str(self.folder),
            images=0,
            generated=sum(per_process),
            skipped=0,
            seconds=time.perf_counter() - self.start,
            load_seconds=generation_start - load_start,
            generation_seconds=generation,
            images_per_second=sum(per_process) / generation if generation > 0 else 0.0,
            processes=self.processes.world,
            per_process=per_process,
            batch_size=self.batch_size,
            texts_encoded=self.processes.total(runner.encoded),
            threads=tuple(self.processes.gather(torch.get_num_threads())),
        )

    def _base_seed(self, stored: dict[str, Any], seed: int | None) -> int:
        error = None
        if self.processes.main:
            old_seed, error = store.check_settings(self.folder, stored, seed)
            seed = (
                seed if seed is not None else old_seed if old_seed is not None else secrets.randbelow(2**32)
            )
        self.processes.agree(error)
        return int(self.processes.broadcast(seed))

    def _left(self, units: list[Unit], planned: list[PlannedItem]) -> tuple[list[Unit], int]:
        """The units with an image still to make (in order) and the images already made; a
        ``ValueError`` when a file holds an image of other settings."""
        names = {p.name for p in self.folder.iterdir()}
        self._digests = {name: line.get("sha256") for name, line in store.read_entries(self.folder).items()}
        left, done, error = [], 0, None
        for unit in units[self.processes.rank :: self.processes.world]:
            finished = 0
            for item, k in unit.images:
                entry = planned[item]
                name = entry.files[k]
                digest = self._digests.get(name)
                state = (
                    store.image_state(self.folder / name, self.expected(entry.job), k, digest)
                    if name in names
                    else None
                )
                if state is not None and state != "done" and error is None:
                    error = (
                        f"{entry.item.where or f'item {item}'}: {self.folder / name} was made with other "
                        f"settings ({state}); restore the item, or choose another -o"
                    )
                finished += state == "done"
            done += finished
            if finished < len(unit.images):
                left.append(unit.number)
        self.processes.agree(error)
        numbers = sorted(n for share in self.processes.gather(left) for n in share)
        return [units[n] for n in numbers], self.processes.total(done)

    def _rounds(
        self,
        left: list[Unit],
        planned: list[PlannedItem],
        runner: UnitRunner,
        journal: store.Journal,
        bar: Any,
    ) -> int:
        """Make this process's share of ``left``; the images it made."""
        world, rank = self.processes.world, self.processes.rank
        mine = left[rank::world]
        made = 0
        try:
            for round_ in range(math.ceil(len(left) / world)):
                now = 0
                if round_ < len(mine):
                    now = self._unit(mine[round_], planned, runner, journal)
                made += now
                bar.update(self.processes.total(now))
        finally:
            journal.close()
        return made

    def _unit(
        self, unit: Unit, planned: list[PlannedItem], runner: UnitRunner, journal: store.Journal
    ) -> int:
        made = 0
        for item, k, image, record in runner.run(unit.images, planned, unit.batched):
            entry = planned[item]
            path = self.folder / entry.files[k]
            if store.image_state(path, self.expected(entry.job), k, self._digests.get(path.name)) == "done":
                continue  # made before the run was stopped; the unit ran again for its other images
            digest = store.write_image(path, image, record)
            journal.add(store.entry(item, k, entry.item.where, path.name, digest, record))
            made += 1
        return made


def _writable(folder: Path) -> str | None:
    try:
        store.check_batch_folder(folder)
        store.check_writable(folder)
    except ValueError as error:
        return str(error)
    return None


def _write_manifest(folder: Path, planned: list[PlannedItem], expected: Callable[[Job], Job]) -> list[str]:
    """Write ``manifest.jsonl`` for every planned image; the files missing (a file that does not match
    its line's sha256 is missing: a rerun makes it again)."""
    known = store.read_entries(folder)
    entries, missing = [], []
    for entry in planned:
        for k, name in enumerate(entry.files):
            line = known.get(name)
            if line is not None and (line.get("item"), line.get("image")) == (entry.index, k):
                if (folder / name).is_file() and sha256_file(folder / name) == line.get("sha256"):
                    entries.append(line)
                else:
                    missing.append(name)
                continue
            if store.image_state(folder / name, expected(entry.job), k) != "done":
                missing.append(name)
                continue
            record = read_png(folder / name)
            entries.append(
                store.entry(entry.index, k, entry.item.where, name, sha256_file(folder / name), record)
            )
    store.write_manifest(folder, entries)
    return missing
