"""Sweep storage (`ray.storage_path`): a folder every node reaches, or an object store URI.

Ray Tune and Train write experiment state and checkpoints there through a pyarrow filesystem;
loraforge reads them back through the same one. Options of a URI stay in it, in pyarrow's
spelling (`s3://bucket/prefix?endpoint_override=host:port&scheme=http` for MinIO or any other
S3-compatible server); credentials come from each node's environment (`AWS_ACCESS_KEY_ID`, an
instance role), never from the config.

Reading a remote checkpoint means downloading it: `Storage.local` copies a folder once into a
local cache (`$LORAFORGE_STORAGE_CACHE`, default `~/.cache/loraforge/storage`) and returns that
copy; on a local folder it returns the folder itself.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline import atomic
from pipeline.config import is_uri


def cache_root() -> Path:
    return Path(os.environ.get("LORAFORGE_STORAGE_CACHE") or Path.home() / ".cache" / "loraforge" / "storage")


@dataclass(frozen=True)
class Storage:
    fs: Any  # pyarrow.fs.FileSystem
    root: str  # a path on `fs`
    written: str  # ray.storage_path as the config gives it, for messages

    @classmethod
    def of(cls, storage_path: Path | str) -> "Storage":
        import pyarrow.fs

        if is_uri(storage_path):
            fs, root = pyarrow.fs.FileSystem.from_uri(str(storage_path))
            return cls(fs, root.rstrip("/"), str(storage_path))
        return cls(pyarrow.fs.LocalFileSystem(), str(Path(storage_path)), str(storage_path))

    @property
    def remote(self) -> bool:
        import pyarrow.fs

        return not isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return str(PurePosixPath(self.root, *parts))

    def describe(self, path: str) -> str:
        """`path` as a user would write it: the URI's scheme in front on an object store."""
        return f"{self.written.split('://', 1)[0]}://{path}" if self.remote else path

    def _info(self, path: str) -> Any:
        return self.fs.get_file_info(path)

    def exists(self, path: str) -> bool:
        import pyarrow.fs

        return self._info(path).type != pyarrow.fs.FileType.NotFound

    def is_file(self, path: str) -> bool:
        import pyarrow.fs

        return self._info(path).type == pyarrow.fs.FileType.File

    def mtime(self, path: str) -> float:
        info = self._info(path)
        return info.mtime.timestamp() if info.mtime else 0.0

    def mkdirs(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)

    def read_text(self, path: str) -> str:
        with self.fs.open_input_stream(path) as f:
            return f.read().decode()

    def write_text(self, path: str, text: str) -> None:
        """Replaces the file whole: temp file, fsync, rename locally; one PUT on an object store."""
        if not self.remote:
            atomic.write_text(path, text)
            return
        with self.fs.open_output_stream(path) as f:
            f.write(text.encode())

    def dirs(self, path: str, pattern: str = "*") -> list[str]:
        """The folders directly in `path` whose names match `pattern`, sorted; [] when `path` is absent."""
        import pyarrow.fs

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                      and fnmatch.fnmatch(PurePosixPath(i.path).name, pattern))

    def local(self, path: str) -> Path:
        """A local folder with the files of the folder `path`: itself, or a copy downloaded once.

        A copy is named by the sha256 of its remote path and replaced whole (staged, then renamed),
        so a download cut short is never taken for a checkpoint. Checkpoints do not change once
        reported, so a present copy is reused.
        """
        if not self.remote:
            return Path(path)
        import pyarrow.fs

        copy = cache_root() / hashlib.sha256(self.describe(path).encode()).hexdigest()[:24] / PurePosixPath(path).name
        if copy.is_dir():
            return copy
        staging = copy.with_name(copy.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        pyarrow.fs.copy_files(path, str(staging), source_filesystem=self.fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        staging.rename(copy)
        return copy
