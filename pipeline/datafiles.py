"""Third-party data files: the manifest that describes them, fetching them, checking them.

No dataset, prompt or schema file of anyone else's is in git. `data_manifest.yaml` (beside
this module) lists each file with its sha256, size, row count, license, source and public
location; `fetch` fills the data root from the first source that has each file (a mirror
folder or URL, then the public location, converted where the source format differs), and
every file is checked against its sha256 before it is used. A dataset is moved into the
data root only when all of its files passed, so a failed fetch never leaves part of one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import download

ROOT_ENV = "LORAFORGE_DATA_ROOT"
MIRROR_ENV = "LORAFORGE_DATA_MIRROR"
OFFLINE_ENV = "LORAFORGE_DATA_OFFLINE"
DEFAULT_ROOT = "data"
STAGING = ".fetch"  # under the data root: downloads in progress (resumable) and datasets being assembled
CHECKOUT = Path(__file__).resolve().parents[1]


class DataError(Exception):
    """A data file that cannot be had or does not match the manifest; one problem per line, each with its fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


# --------------------------------------------------------------------------- the manifest


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Spec):
    repo: str = Field(description="GitHub owner/repo the file comes from.")
    commit: str = Field(pattern=r"^[0-9a-f]{7,40}$", description=(
        "The commit: its full hash, or the abbreviated one the source names (the blob hash pins the bytes)."))
    path: str = Field(description="Path of the source file in that commit.")
    blob: str | None = Field(None, pattern=r"^[0-9a-f]{40}$", description="Git blob hash of the source file.")
    member: str | None = Field(None, description="The member to read when the source is a zip archive.")
    member_blob: str | None = Field(None, pattern=r"^[0-9a-f]{40}$")
    lines: tuple[int, int] | None = Field(None, description=(
        "The file is these lines of the source (1-based, inclusive), byte for byte."))


class Replace(_Spec):
    row: int = Field(ge=0, description="0-based row index in the source.")
    column: str
    old: str
    new: str


class Conversion(_Spec):
    """How the file is made from its source when the formats differ."""

    format: Literal["tsv", "csv", "json", "jsonl"]
    columns: dict[str, str] = Field(description="Output field -> source column, in output order.")
    int_columns: list[str] = Field(default_factory=list, description="Output fields parsed as int.")
    strip: bool = Field(False, description="Strip surrounding whitespace from string fields.")
    explode: str | None = Field(None, description="A list field: one output row per element, merged with its record.")
    replace: list[Replace] = Field(default_factory=list, description="Exact fixes to single source values.")


class DataFile(_Spec):
    path: str = Field(description="Path under the data root.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    rows: int = Field(ge=0, description="Records of a .jsonl file, lines of any other text file.")
    source: Source
    url: str = Field(pattern=r"^https?://", description="Public location a user online fetches the source from.")
    convert: Conversion | None = None
    mirror_path: str | None = Field(None, description="Path in a mirror (default data/<path>).")

    @property
    def in_mirror(self) -> str:
        return self.mirror_path or f"data/{self.path}"


class Dataset(_Spec):
    title: str
    license: str
    attribution: str
    files: list[DataFile]


class Manifest(_Spec):
    datasets: dict[str, Dataset]

    def entries(self) -> Iterator[tuple[str, DataFile]]:
        for name, dataset in self.datasets.items():
            for entry in dataset.files:
                yield name, entry

    def find(self, rel_path: str) -> tuple[str, DataFile] | None:
        """(dataset name, file) for a path under the data root, or None if the manifest does not know it."""
        return next(((name, f) for name, f in self.entries() if f.path == rel_path), None)

    def select(self, names: list[str]) -> dict[str, list[DataFile]]:
        """Dataset names or file paths -> the files to fetch, per dataset; unknown names are errors."""
        if not names:
            return {name: list(ds.files) for name, ds in self.datasets.items()}
        chosen: dict[str, list[DataFile]] = {}
        unknown = []
        for wanted in names:
            wanted = wanted.strip("/")
            if wanted in self.datasets:
                chosen[wanted] = list(self.datasets[wanted].files)
            elif (hit := self.find(wanted)) is not None:
                files = chosen.setdefault(hit[0], [])
                files += [hit[1]] if hit[1] not in files else []
            else:
                unknown.append(wanted)
        if unknown:
            raise DataError([f"unknown data name {u!r}: give a dataset ({', '.join(self.datasets)}) "
                             f"or a file path from `loraforge data list`" for u in unknown])
        return chosen


def load_manifest(path: Path | None = None) -> Manifest:
    """The manifest beside this module (or `path`), validated."""
    text = path.read_text(encoding="utf-8") if path else \
        resources.files("pipeline").joinpath("data_manifest.yaml").read_text(encoding="utf-8")
    try:
        return Manifest.model_validate(yaml.safe_load(text))
    except ValidationError as err:
        raise DataError([f"data manifest {path or 'pipeline/data_manifest.yaml'}: {err}"]) from None


# --------------------------------------------------------------------------- where files live


def data_root(env: Mapping[str, str] | None = None) -> Path:
    """LORAFORGE_DATA_ROOT, else `data/` in the current directory; absolute."""
    env = os.environ if env is None else env
    return Path(env.get(ROOT_ENV) or DEFAULT_ROOT).expanduser().resolve()


def default_mirror(env: Mapping[str, str] | None = None) -> str | None:
    """LORAFORGE_DATA_MIRROR, else `../shared/` beside the checkout when it exists."""
    env = os.environ if env is None else env
    if env.get(MIRROR_ENV):
        return env[MIRROR_ENV]
    shared = CHECKOUT.parent / "shared"
    return str(shared) if shared.is_dir() else None


def offline(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(OFFLINE_ENV, "").lower() in {"1", "true", "yes"}


# --------------------------------------------------------------------------- checking


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_blob_of(data: bytes) -> str:
    """Git's object id for a blob: sha1 of `blob <size>\\0` + the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def mismatch(path: Path, entry: DataFile) -> str | None:
    """Why `path` is not the manifest's file (size or sha256), or None when it is."""
    size = path.stat().st_size
    if size != entry.size:
        return f"size {size} bytes, the manifest says {entry.size}"
    digest = sha256_of(path)
    if digest != entry.sha256:
        return f"sha256 {digest}, the manifest says {entry.sha256}"
    return None


def fix_for(name: str) -> str:
    return f"run `loraforge data fetch {name}`"


def check_file(path: Path, *, env: Mapping[str, str] | None = None, manifest: Manifest | None = None) -> str | None:
    """Problem with a data file a config points at, or None.

    A file under the data root that the manifest knows must be present and match its
    sha256; the message names the fetch command. Other files only need to exist.
    """
    root = data_root(env)
    try:
        rel = path.resolve().relative_to(root).as_posix()
    except ValueError:
        rel = None
    hit = (manifest or load_manifest()).find(rel) if rel else None
    if hit is None:
        return None if path.is_file() else f"file {str(path)!r} not found (relative paths are read under the data root {root})"
    name, entry = hit
    if not path.is_file():
        return f"file {str(path)!r} not found; it is the manifest's {name!r} data: {fix_for(name)}"
    problem = mismatch(path, entry)
    if problem:
        return (f"{path} does not match the data manifest ({problem}); it was changed or is a partial copy: "
                f"move it away and {fix_for(name)}, or `loraforge data fetch {name} --force` to replace it")
    return None


def require(rel_path: str, *, env: Mapping[str, str] | None = None) -> Path:
    """The checked path of a manifest file under the data root (for benchmarks and tests); DataError if not usable."""
    path = data_root(env) / rel_path
    problem = check_file(path, env=env)
    if problem:
        raise DataError([problem])
    return path


@dataclass(frozen=True)
class FileStatus:
    dataset: str
    entry: DataFile
    license: str
    state: Literal["verified", "missing", "differs"]
    detail: str = ""


def status(root: Path, manifest: Manifest | None = None) -> list[FileStatus]:
    """Each manifest file: present and verified, missing, or different from the manifest."""
    manifest = manifest or load_manifest()
    out = []
    for name, entry in manifest.entries():
        path = root / entry.path
        license_ = manifest.datasets[name].license
        if not path.is_file():
            out.append(FileStatus(name, entry, license_, "missing"))
        elif problem := mismatch(path, entry):
            out.append(FileStatus(name, entry, license_, "differs", problem))
        else:
            out.append(FileStatus(name, entry, license_, "verified"))
    return out


# --------------------------------------------------------------------------- conversions


def _source_rows(raw: bytes, conversion: Conversion) -> list[dict[str, Any]]:
    text = raw.decode("utf-8-sig")
    match conversion.format:
        case "tsv":
            return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
        case "csv":
            return list(csv.DictReader(io.StringIO(text, newline="")))
        case "json":
            return json.loads(text)
        case "jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
    raise ValueError(f"unknown source format {conversion.format!r}")


def convert(raw: bytes, conversion: Conversion) -> bytes:
    """The source's bytes -> our JSONL (one `json.dumps(row, ensure_ascii=False)` a line)."""
    records = _source_rows(raw, conversion)
    for fix in conversion.replace:
        value = records[fix.row].get(fix.column)
        if value != fix.old:
            raise ValueError(f"row {fix.row} column {fix.column!r} is {value!r}, expected {fix.old!r} to replace")
        records[fix.row] = {**records[fix.row], fix.column: fix.new}
    if conversion.explode:
        records = [{**record, **element} for record in records for element in record[conversion.explode]]
    lines = []
    for i, record in enumerate(records):
        row = {}
        for out_field, column in conversion.columns.items():
            if column not in record:
                raise ValueError(f"source row {i} has no column {column!r} (has {sorted(record)})")
            value = record[column]
            if conversion.strip and isinstance(value, str):
                value = value.strip()
            if out_field in conversion.int_columns:
                value = int(value)
            row[out_field] = value
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    return "".join(lines).encode("utf-8")


# --------------------------------------------------------------------------- sources


class Missing(Exception):
    """This source does not have the file (say why in the message); try the next one."""


def _from_mirror_folder(mirror: Path, entry: DataFile, staged: Path) -> None:
    src = mirror / entry.in_mirror
    if not src.is_file():
        raise Missing(f"no file {entry.in_mirror}")
    shutil.copyfile(src, staged)


def _from_url(url: str, staged: Path, label: str) -> None:
    try:
        download.download(url, staged, label=label)
    except (download.NotThere, download.DownloadError) as err:
        raise Missing(str(err)) from None


def _from_public(entry: DataFile, staged: Path, scratch: Path) -> None:
    """Download from the public location; a source in another format is checked against its git blob, then converted."""
    if entry.convert is None and entry.source.member is None and entry.source.lines is None:
        _from_url(entry.url, staged, entry.path)  # the file itself: the sha256 check follows
        return
    raw_path = scratch / (entry.path.replace("/", "__") + ".source")
    _from_url(entry.url, raw_path, entry.path)
    raw = raw_path.read_bytes()
    raw_path.unlink()
    source = entry.source
    if source.blob and (blob := git_blob_of(raw)) != source.blob:
        raise Missing(f"the download is git blob {blob}, not {source.blob} "
                      f"({source.repo}@{source.commit[:12]}:{source.path}); refused")
    if source.member:
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                raw = archive.read(source.member)
        except (zipfile.BadZipFile, KeyError) as err:
            raise Missing(f"cannot read {source.member} from the archive: {err}") from None
        if source.member_blob and (blob := git_blob_of(raw)) != source.member_blob:
            raise Missing(f"zip member {source.member} is git blob {blob}, not {source.member_blob}; refused")
    if source.lines:
        first, last = source.lines
        raw = b"".join(raw.splitlines(keepends=True)[first - 1:last])
    try:
        staged.write_bytes(convert(raw, entry.convert) if entry.convert else raw)
    except (ValueError, KeyError, TypeError, IndexError, csv.Error) as err:
        raise Missing(f"the source does not convert as the manifest says: {err}") from None


Fetcher = Callable[[Path, Path], None]  # (staged file, scratch folder) -> None, or raises Missing


def _sources(entry: DataFile, mirror: str | None, use_public: bool) -> list[tuple[str, Fetcher]]:
    """(description, fetcher) for each place to try, in order."""
    sources: list[tuple[str, Fetcher]] = []
    if mirror:
        if mirror.startswith(("http://", "https://")):
            url = mirror.rstrip("/") + "/" + entry.in_mirror
            sources.append((f"mirror {url}", lambda staged, scratch: _from_url(url, staged, entry.path)))
        else:
            folder = Path(mirror).expanduser()
            sources.append((f"mirror {folder}", lambda staged, scratch: _from_mirror_folder(folder, entry, staged)))
    if use_public:
        sources.append((entry.url, lambda staged, scratch: _from_public(entry, staged, scratch)))
    return sources


# --------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class Fetched:
    dataset: str
    path: str
    how: str  # "already present" or the source it came from


def fetch(names: list[str] | None = None, *, root: Path | None = None, mirror: str | None = None,
          use_public: bool | None = None, force: bool = False, manifest: Manifest | None = None,
          echo=print) -> list[Fetched]:
    """Fill `root` with the named datasets (or files; all when none), each file checked against its sha256.

    A file already present and verified is kept. One that differs is an error unless
    `force`, so local edits are never overwritten silently. A dataset is moved into
    place only when every file of it verified; otherwise nothing of it is, and the
    error names each file, every source tried and the variable to set.
    """
    manifest = manifest or load_manifest()
    root = (root or data_root()).resolve()
    mirror = default_mirror() if mirror is None else mirror
    use_public = (not offline()) if use_public is None else use_public
    staging = root / STAGING
    done: list[Fetched] = []
    problems: list[str] = []
    for name, entries in manifest.select(names or []).items():
        staged: dict[str, Path] = {}
        fetched: list[Fetched] = []
        dataset_problems = []
        for entry in entries:
            dest = root / entry.path
            blocked = next((p for p in (dest, *dest.parents) if p != root and p.is_relative_to(root)
                            and (p.exists() or p.is_symlink()) and (p == dest) != p.is_file()), None)
            if blocked is not None:
                kind = "a folder" if blocked.is_dir() else "not a regular file"
                dataset_problems.append(f"{blocked}: {kind} where the data manifest puts "
                                        f"{'the file' if blocked == dest else 'a folder for'} {entry.path}; move it away "
                                        "and fetch again")
                continue
            if dest.is_file():
                problem = mismatch(dest, entry)
                if problem is None:
                    fetched.append(Fetched(name, entry.path, "already present"))
                    echo(f"{entry.path}: present, verified")
                    continue
                if not force:
                    dataset_problems.append(
                        f"{dest}: differs from the data manifest ({problem}); move it away, or pass --force to replace it")
                    continue
            got, where, tried = _fetch_one(entry, staging, mirror, use_public)
            if got is None:
                hint = (f"set {MIRROR_ENV} to a folder or http(s) URL that holds {entry.in_mirror}"
                        + ("" if use_public else f", or go online and unset {OFFLINE_ENV}"))
                dataset_problems.append(f"{entry.path} ({name}): no source could give it; tried:\n"
                                        + "".join(f"      {t}\n" for t in tried) + f"    fix: {hint}")
                continue
            staged[entry.path] = got
            fetched.append(Fetched(name, entry.path, where))
            echo(f"{entry.path}: fetched from {where}, sha256 verified")
        if dataset_problems:  # nothing of this dataset moves into the data root
            for path in staged.values():
                path.unlink(missing_ok=True)
            problems += dataset_problems
            continue
        for rel, path in staged.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, root / rel)
        done += fetched
    _prune_empty(staging)
    if problems:
        raise DataError(problems)
    return done


def _prune_empty(folder: Path) -> None:
    """Drop empty staging folders; partial downloads (`.part`, kept for resuming) keep theirs."""
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [folder]:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _fetch_one(entry: DataFile, staging: Path, mirror: str | None,
               use_public: bool) -> tuple[Path | None, str, list[str]]:
    """Try each source in turn: (the staged, verified file or None, the source that gave it, what each said)."""
    staged = staging / "files" / entry.path
    scratch = staging / "sources"
    staged.parent.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    tried = []
    for where, get in _sources(entry, mirror, use_public):
        try:
            get(staged, scratch)
        except Missing as err:
            tried.append(f"{where}: {err}")
            continue
        problem = mismatch(staged, entry)
        if problem:
            staged.unlink()
            tried.append(f"{where}: refused, {problem}")
            continue
        return staged, where, tried
    if not tried:
        tried.append(f"no source: no mirror ({MIRROR_ENV} unset, no ../shared/ beside the checkout) "
                     f"and the public location is off ({OFFLINE_ENV})")
    return None, "", tried
