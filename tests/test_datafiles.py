"""The data manifest and `loraforge data`: mirror folders, real HTTP on loopback (cut and resumed,
a flipped byte refused), conversions from source formats, and the errors a user sees."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import datafiles, download
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.preflight import check_data_files
from tests.support.configs import REPO, minilm_config, write_yaml

MANIFEST = datafiles.load_manifest()


def mirror_with(tmp: Path, *names: str) -> Path:
    """A mirror folder in the shared/ layout holding the manifest files of `names` (datasets or files)."""
    mirror = tmp / "mirror"
    for entries in MANIFEST.select(list(names)).values():
        for entry in entries:
            dest = mirror / entry.in_mirror
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(datafiles.require(entry.path), dest)
    return mirror


class Loopback:
    """A real HTTP server on 127.0.0.1 with Range support that can cut a response or flip a byte."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.cut_once: dict[str, int] = {}  # path -> bytes sent before the connection drops, first request only
        self.flip: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if self.path in server.flip:
                    body = body[:100] + bytes([body[100] ^ 0x01]) + body[101:]
                start = 0
                if (ranged := self.headers.get("Range")) is not None:
                    start = int(ranged.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.cut_once.pop(self.path, None)
                self.wfile.write(body[start:cut] if cut is not None else body[start:])
                self.wfile.flush()
                if cut is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "Loopback":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def served_mirror(*names: str) -> dict[str, bytes]:
    return {f"/{entry.in_mirror}": datafiles.require(entry.path).read_bytes()
            for entries in MANIFEST.select(list(names)).values() for entry in entries}


# --------------------------------------------------------------------------- the manifest and the data root


def test_every_manifest_file_in_the_data_root_is_verified_with_its_row_count():
    root = datafiles.data_root()
    states = datafiles.status(root)
    assert {s.state for s in states} == {"verified"}, [(s.entry.path, s.state, s.detail) for s in states]
    for item in states:
        assert (root / item.entry.path).read_bytes().count(b"\n") == item.entry.rows, item.entry.path
        assert item.license and MANIFEST.datasets[item.dataset].attribution
        assert item.entry.source.repo.count("/") == 1 and item.entry.url.startswith("https://")


def test_git_tracks_no_third_party_data_file():
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    tracked = [REPO / name.decode() for name in tracked if name]
    assert len(tracked) > 50
    # an empty file (the oracle's empty metrics/__init__.py) is no third-party content: every empty file has its hash
    known = {entry.sha256 for _, entry in MANIFEST.entries() if entry.size > 0}
    copies = [str(p) for p in tracked if p.is_file() and datafiles.sha256_of(p) in known]
    assert copies == []
    assert [p for p in tracked if p.parent.parent == REPO / "data" or REPO / "data" in p.parents] == \
        [REPO / "data" / "README.md"]


@pytest.mark.parametrize("name", ["sst2/dev.jsonl", "e2e/dev.jsonl", "alpaca/train.jsonl", "alpaca/seed_tasks.jsonl"])
def test_conversion_from_the_source_format_reproduces_the_file(name: str):
    """A source holding the same values in the upstream format converts to our bytes exactly."""
    _, entry = MANIFEST.find(name)
    rows = [json.loads(line) for line in datafiles.require(name).read_text(encoding="utf-8").splitlines()]
    match entry.convert.format:
        case "tsv":  # GLUE rows end in a space, which the conversion strips
            source = "sentence\tlabel\n" + "".join(f"{r['sentence']} \t{r['label']}\n" for r in rows)
        case "csv":
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(["mr", "ref"])
            writer.writerows([[r["mr"], f" {r['ref']}"] for r in rows])
            source = buffer.getvalue()
        case "json":
            source = json.dumps([{**r, "output": r["output"] + "\n"} for r in rows], indent=2)
        case "jsonl":
            source = "".join(json.dumps({"id": f"seed_task_{i}", "name": "t", "instruction": r["instruction"],
                                         "instances": [{"input": r["input"], "output": r["output"]}],
                                         "is_classification": False}) + "\n" for i, r in enumerate(rows))
    converted = datafiles.convert(source.encode("utf-8"), entry.convert)
    assert hashlib.sha256(converted).hexdigest() == entry.sha256


# --------------------------------------------------------------------------- sources


def test_fetch_from_a_mirror_folder_then_keeps_verified_files(tmp_path: Path):
    mirror = mirror_with(tmp_path, "mt_bench", "kuberay-crds")
    root = tmp_path / "root"
    done = datafiles.fetch(["mt_bench", "kuberay-crds"], root=root, mirror=str(mirror), use_public=False)
    assert {d.path for d in done} == {e.path for e in MANIFEST.datasets["mt_bench"].files} | \
        {e.path for e in MANIFEST.datasets["kuberay-crds"].files}
    assert {d.how for d in done} == {f"mirror {mirror}"}
    assert (root / "kuberay-crds" / "ray.io_rayjobs.yaml").is_file()  # from reference/, laid out by the manifest
    assert all(s.state == "verified" for s in datafiles.status(root) if s.dataset in ("mt_bench", "kuberay-crds"))
    assert not (root / datafiles.STAGING).exists()
    again = datafiles.fetch(["mt_bench"], root=root, mirror=str(tmp_path / "gone"), use_public=False)
    assert {d.how for d in again} == {"already present"}


def test_a_dataset_lands_whole_or_not_at_all(tmp_path: Path):
    mirror = mirror_with(tmp_path, "mt_bench")
    (mirror / "data" / "mt_bench" / "judge_prompts.jsonl").unlink()
    root = tmp_path / "root"
    with pytest.raises(datafiles.DataError) as info:
        datafiles.fetch(["mt_bench"], root=root, mirror=str(mirror), use_public=False)
    assert "mt_bench/judge_prompts.jsonl (mt_bench): no source could give it" in str(info.value)
    assert not (root / "mt_bench").exists()


def test_http_fetch_resumes_a_transfer_cut_in_the_middle(tmp_path: Path):
    with Loopback(served_mirror("e2e/dev.jsonl")) as server:
        server.cut_once["/data/e2e/dev.jsonl"] = 400_000
        done = datafiles.fetch(["e2e/dev.jsonl"], root=tmp_path / "root", mirror=server.url + "/", use_public=False)
    assert done[0].how == f"mirror {server.url}/data/e2e/dev.jsonl"
    (first, no_range), (second, ranged) = server.requests
    assert first == second == "/data/e2e/dev.jsonl" and no_range is None
    # It resumes from what reached the disk: up to the cut, less the chunk in flight when it broke.
    assert 400_000 - download.CHUNK <= int(ranged.removeprefix("bytes=").rstrip("-")) <= 400_000
    assert datafiles.mismatch(tmp_path / "root" / "e2e" / "dev.jsonl", MANIFEST.find("e2e/dev.jsonl")[1]) is None


def test_http_fetch_resumes_a_part_left_by_an_earlier_run(tmp_path: Path):
    root = tmp_path / "root"
    part = root / datafiles.STAGING / "files" / "sst2" / "dev.jsonl.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(datafiles.require("sst2/dev.jsonl").read_bytes()[:50_000])
    with Loopback(served_mirror("sst2/dev.jsonl")) as server:
        datafiles.fetch(["sst2/dev.jsonl"], root=root, mirror=server.url, use_public=False)
    assert server.requests == [("/data/sst2/dev.jsonl", "bytes=50000-")]
    assert (root / "sst2" / "dev.jsonl").read_bytes() == datafiles.require("sst2/dev.jsonl").read_bytes()


def test_a_byte_flipped_on_the_server_is_refused_with_exit_2(tmp_path: Path):
    root = tmp_path / "root"
    with Loopback(served_mirror("mt_bench")) as server:
        server.flip.add("/data/mt_bench/question.jsonl")
        result = CliRunner().invoke(app, ["data", "fetch", "mt_bench", "--root", str(root), "--mirror", server.url],
                                    env={datafiles.OFFLINE_ENV: "1"})
    assert result.exit_code == 2, result.output
    assert "mt_bench/question.jsonl (mt_bench): no source could give it" in result.output
    assert f"mirror {server.url}/data/mt_bench/question.jsonl: refused, sha256 " in result.output
    assert "Traceback" not in result.output
    assert not (root / "mt_bench").exists()  # its two good files were not moved in either


def test_no_source_exits_2_naming_the_file_the_sources_and_the_variable(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["data", "fetch", "sst2", "--root", str(tmp_path / "root"), "--mirror", str(empty)],
                                env={datafiles.OFFLINE_ENV: "1"})
    assert result.exit_code == 2
    assert "sst2/train.jsonl (sst2): no source could give it" in result.output
    assert f"mirror {empty}: no file data/sst2/train.jsonl" in result.output
    assert "set LORAFORGE_DATA_MIRROR to a folder or http(s) URL that holds data/sst2/train.jsonl" in result.output
    assert "unset LORAFORGE_DATA_OFFLINE" in result.output and "Traceback" not in result.output
    unknown = CliRunner().invoke(app, ["data", "fetch", "sst3", "--root", str(tmp_path / "root")])
    assert unknown.exit_code == 2 and "unknown data name 'sst3'" in unknown.output


def public_entry(url: str, source: bytes, made: bytes, convert: dict | None, **source_fields) -> datafiles.Manifest:
    return datafiles.Manifest.model_validate({"datasets": {"toy": {
        "title": "toy", "license": "CC0", "attribution": "us", "files": [{
            "path": "toy/rows.jsonl", "sha256": hashlib.sha256(made).hexdigest(), "size": len(made),
            "rows": made.count(b"\n"), "url": url, "convert": convert,
            "source": {"repo": "o/r", "commit": "0" * 40, "path": "rows.tsv",
                       "blob": datafiles.git_blob_of(source), **source_fields}}]}}})


def test_public_location_is_downloaded_checked_and_converted(tmp_path: Path):
    long_text = " ".join(["fine"] * 30)
    tsv = f"label\tsentence\r\n1\tgood \r\n0\t10000\r\n1\t{long_text} \r\n".encode()
    made = ('{"sentence": "good", "label": 1}\n{"sentence": "10,000", "label": 0}\n'
            f'{{"sentence": "{long_text}", "label": 1}}\n').encode()
    conversion = {"format": "tsv", "columns": {"sentence": "sentence", "label": "label"}, "int_columns": ["label"],
                  "strip": True, "replace": [{"row": 1, "column": "sentence", "old": "10000", "new": "10,000"}]}
    with Loopback({"/o/r/rows.tsv": tsv}) as server:
        manifest = public_entry(server.url + "/o/r/rows.tsv", tsv, made, conversion)
        done = datafiles.fetch([], root=tmp_path / "root", mirror="", use_public=True, manifest=manifest)
        assert done[0].how == server.url + "/o/r/rows.tsv"
        assert (tmp_path / "root" / "toy" / "rows.jsonl").read_bytes() == made

        server.flip.add("/o/r/rows.tsv")  # one bit of byte 100 (inside the long row): the blob hash catches it
        with pytest.raises(datafiles.DataError) as info:
            datafiles.fetch([], root=tmp_path / "other", mirror="", use_public=True, manifest=manifest)
    assert f"{server.url}/o/r/rows.tsv: the download is git blob" in str(info.value) and "refused" in str(info.value)
    assert not (tmp_path / "other" / "toy").exists()


def test_public_zip_member_is_read_and_checked(tmp_path: Path):
    member = b"mr,ref\nname[A],\" A is here. \"\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("set/trainset.csv", member)
    made = '{"mr": "name[A]", "ref": "A is here."}\n'.encode()
    with Loopback({"/set.zip": buffer.getvalue()}) as server:
        manifest = public_entry(server.url + "/set.zip", buffer.getvalue(), made,
                                {"format": "csv", "columns": {"mr": "mr", "ref": "ref"}, "strip": True},
                                member="set/trainset.csv", member_blob=datafiles.git_blob_of(member))
        datafiles.fetch([], root=tmp_path / "root", mirror="", use_public=True, manifest=manifest)
    assert (tmp_path / "root" / "toy" / "rows.jsonl").read_bytes() == made


def test_public_line_range_is_cut_from_the_checked_source(tmp_path: Path):
    """The GPT-4 judgments are lines 301-800 of FastChat's file: downloaded whole, blob-checked, cut byte for byte."""
    ours = datafiles.require("mt_bench_gpt4_judgments/gpt-4_single.calib500.jsonl").read_bytes()
    source = b"".join(b'{"question_id": %d, "skipped": true}\r\n' % i for i in range(300)) + ours
    with Loopback({"/judgments.jsonl": source}) as server:
        manifest = public_entry(server.url + "/judgments.jsonl", source, ours, None, lines=(301, 800))
        datafiles.fetch([], root=tmp_path / "root", mirror="", use_public=True, manifest=manifest)
    assert (tmp_path / "root" / "toy" / "rows.jsonl").read_bytes() == ours


# --------------------------------------------------------------------------- files in the data root


def test_a_changed_file_is_reported_and_replaced_only_with_force(tmp_path: Path):
    mirror = mirror_with(tmp_path, "mt_bench")
    root = tmp_path / "root"
    datafiles.fetch(["mt_bench"], root=root, mirror=str(mirror), use_public=False)
    edited = root / "mt_bench" / "question.jsonl"
    edited.write_text(edited.read_text().replace("Hawaii", "Hawai'i"))
    listing = CliRunner().invoke(app, ["data", "list", "--root", str(root)])
    assert listing.exit_code == 0
    lines = {line.split("│")[2].strip(): line for line in listing.output.splitlines() if line.count("│") > 3}
    assert "DIFFERS" in lines["mt_bench/question.jsonl"] and "present, verified" in lines["mt_bench/judge_prompts.jsonl"]
    assert "missing" in lines["sst2/train.jsonl"] and "Apache-2.0" in lines["mt_bench/judge_prompts.jsonl"]

    with pytest.raises(datafiles.DataError, match="differs from the data manifest.*--force"):
        datafiles.fetch(["mt_bench"], root=root, mirror=str(mirror), use_public=False)
    assert "Hawai'i" in edited.read_text()  # never overwritten silently
    datafiles.fetch(["mt_bench"], root=root, mirror=str(mirror), use_public=False, force=True)
    assert datafiles.mismatch(edited, MANIFEST.find("mt_bench/question.jsonl")[1]) is None


def test_config_paths_are_read_under_the_data_root_and_checked(tmp_path: Path, sst2_small):
    raw = minilm_config(tmp_path, sst2_small)
    raw["data"].update(train_path="sst2/train.jsonl", eval_path="sst2/dev.jsonl")
    path = write_yaml(tmp_path / "c.yaml", raw)
    root = tmp_path / "root"
    mirror = mirror_with(tmp_path, "sst2")
    config = load_config(path, env={datafiles.ROOT_ENV: str(root)})
    assert config.data.train_path == root / "sst2" / "train.jsonl"
    env = {datafiles.ROOT_ENV: str(root)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(datafiles.ROOT_ENV, str(root))
        problems = check_data_files(config)
        assert problems == [f"data.train_path: file '{root / 'sst2' / 'train.jsonl'}' not found; it is the manifest's "
                            "'sst2' data: run `loraforge data fetch sst2`",
                            f"data.eval_path: file '{root / 'sst2' / 'dev.jsonl'}' not found; it is the manifest's "
                            "'sst2' data: run `loraforge data fetch sst2`"]
        datafiles.fetch(["sst2"], root=root, mirror=str(mirror), use_public=False)
        assert check_data_files(config) == []
        with (root / "sst2" / "dev.jsonl").open("a") as f:
            f.write('{"sentence": "added", "label": 1}\n')
        [problem] = check_data_files(config)
        assert problem.startswith("data.eval_path: ") and "does not match the data manifest (size" in problem
        assert "loraforge data fetch sst2 --force" in problem
    assert load_config(path, [f"data.train_path={sst2_small['train']}"], env=env).data.train_path == sst2_small["train"]
