"""The official E2E NLG scoring script (tuetschek/e2e-metrics) as a test oracle.

Its files come from the data manifest (dataset `e2e-metrics`, fetched by `loraforge data fetch`);
the three jars it runs but its repository leaves out are byte-identical to those in the `pycocoevalcap`
wheel loraforge installs, and are copied from there (checked by sha256). It needs Java, Perl with
XML::Twig (`.ci/run` installs Debian's libxml-twig-perl) and the Python packages `future` and
`scikit-image` (the `test` extra).

Two ways to run it:
- `run_script`: `python measure_scores.py REFS HYP` exactly as a user runs it; its printed figures.
- `run_cases`: many corpora in one process, as `measure_scores.evaluate` scores each: BLEU and NIST by its
  own `run_mteval` (the Perl mteval-v13a-sig) per corpus; METEOR, ROUGE_L and CIDEr by the script's own
  copies of the pycocoevalcap scorers per corpus, with one PTB tokenizer run and one METEOR process for all
  of them (Java starts once, not three times a corpus). Each figure is printed as the script prints it
  (`%.4f`). A test checks that this gives the figures `run_script` prints.

The oracle runs in its own process: its `pycocoevalcap` package (a copy of the script's folder) must never
be the one loraforge's own E2E metrics import in the test process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
DATASET = "e2e-metrics"
# not in the script's repository snapshot; the same blobs as in the pycocoevalcap 1.2 wheel (SOURCES.md)
WHEEL_BINARIES = {
    "pycocoevalcap/meteor/meteor-1.5.jar": "1e57b4c72c0830ebe68558f1c799a624e96cbc1b6045c9f6330e26dcff6eafc2",
    "pycocoevalcap/meteor/data/paraphrase-en.gz": "c147ac7d2c91f2fbb3ad31e4b352235061eb83145e0434daf217ee9ca5975f48",
    "pycocoevalcap/tokenizer/stanford-corenlp-3.4.1.jar": "2fcb91bb7a111f93d71e264f4ee0e3afd19ba0dde6d21b38605088df9e940399",
}


class OracleUnavailable(RuntimeError):
    """Something the official script needs is missing; says how to get it."""


def check_requirements() -> None:
    """Java, Perl's XML::Twig, `future` and `skimage`: each missing one named with its install command."""
    problems = []
    if shutil.which("java") is None:
        problems.append("java (apt-get install default-jre-headless)")
    perl = subprocess.run(["perl", "-MXML::Twig", "-e", "1"], capture_output=True, text=True)
    if perl.returncode != 0:
        problems.append("Perl's XML::Twig (apt-get install libxml-twig-perl)")
    for module, package in (("future", "future"), ("skimage", "scikit-image")):
        probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
        if probe.returncode != 0:
            problems.append(f"Python package {package} (pip install -e '.[test]')")
    if problems:
        raise OracleUnavailable("the official E2E script needs: " + "; ".join(problems))


def build(dest: Path) -> Path:
    """A runnable copy of the official script in `dest`: manifest files plus the wheel's jars."""
    from pipeline import datafiles

    check_requirements()
    manifest = datafiles.load_manifest()
    prefix = "e2e-metrics/"
    for entry in manifest.datasets[DATASET].files:
        source = datafiles.require(entry.path)  # named DataError (and `loraforge data fetch`) when missing or changed
        target = dest / entry.path.removeprefix(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise OracleUnavailable("the pycocoevalcap wheel is not installed (pip install -e '.[eval]')")
    wheel = Path(list(spec.submodule_search_locations)[0]).parent
    for rel, sha in WHEEL_BINARIES.items():
        source = wheel / rel
        if not source.is_file() or datafiles.sha256_of(source) != sha:
            raise OracleUnavailable(f"{source}: missing or not the pycocoevalcap 1.2 file (sha256 {sha})")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest / rel)
    return dest


def write_inputs(folder: Path, references: list[list[str]], hypotheses: list[str]) -> tuple[Path, Path]:
    """The script's input files: references one a line, instances separated by a blank line; outputs one a line."""
    folder.mkdir(parents=True, exist_ok=True)
    refs = folder / "refs.txt"
    refs.write_text("\n\n".join("\n".join(r) for r in references) + "\n", encoding="utf-8")
    hyps = folder / "hyps.txt"
    hyps.write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
    return refs, hyps


def _figures(printed: str) -> dict[str, str]:
    found = dict(re.findall(r"^(BLEU|NIST|METEOR|ROUGE_L|CIDEr): ([0-9.]+)$", printed, re.M))
    if set(found) != set(METRICS):
        raise RuntimeError(f"the official script printed no scores:\n{printed[-3000:]}")
    return {m: found[m] for m in METRICS}


def run_script(oracle: Path, refs: Path, hyps: Path) -> dict[str, str]:
    """`python measure_scores.py REFS HYP` in the oracle's folder: the five figures it prints."""
    out = subprocess.run([sys.executable, "measure_scores.py", str(refs), str(hyps)], cwd=oracle,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"measure_scores.py failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return _figures(out.stdout)


def run_cases(oracle: Path, cases: list[tuple[list[list[str]], list[str]]], scratch: Path) -> list[dict[str, str]]:
    """The five figures of each corpus (references, hypotheses), scored by the script's code in one process.

    Each corpus goes through the script's `load_data` from files, as `measure_scores.py` reads them."""
    listing = []
    for i, (references, hypotheses) in enumerate(cases):
        refs, hyps = write_inputs(scratch / f"case{i:03d}", references, hypotheses)
        listing.append([str(refs), str(hyps)])
    (scratch / "cases.json").write_text(json.dumps(listing))
    out = subprocess.run([sys.executable, __file__, str(oracle), str(scratch / "cases.json")], cwd=oracle,
                         capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONPATH": ""})
    if out.returncode != 0:
        raise RuntimeError(f"the oracle failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main(oracle: str, cases_file: str) -> None:
    """In the oracle's folder: every case through the script's own functions (see `run_cases`)."""
    import contextlib
    import io

    sys.path.insert(0, oracle)
    import measure_scores as ms  # the official script (its folder first on sys.path)
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO

    assert Path(ms.__file__).resolve().parent == Path(oracle).resolve(), ms.__file__
    loaded = [ms.load_data(refs, hyps) for refs, hyps in json.loads(Path(cases_file).read_text())]
    results: list[dict[str, str]] = []
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        # as run_coco_eval builds them: COCO ground truth and results, one image id per instance; ids made
        # unique across cases so that one tokenizer run covers every corpus
        gts_all, res_all = {}, {}
        for case, (_, data_ref, data_sys) in enumerate(loaded):
            coco = COCO()
            coco.dataset = ms.create_coco_refs(data_ref)
            coco.createIndex()
            coco_res = coco.loadRes(resData=ms.create_coco_sys(data_sys))
            for image in coco.getImgIds():
                gts_all[(case, image)] = coco.imgToAnns[image]
                res_all[(case, image)] = coco_res.imgToAnns[image]
        tokenizer = PTBTokenizer()
        gts_all, res_all = tokenizer.tokenize(gts_all), tokenizer.tokenize(res_all)
        meteor = Meteor()
        for case, (data_src, data_ref, data_sys) in enumerate(loaded):
            gts = {image: v for (c, image), v in gts_all.items() if c == case}
            res = {image: v for (c, image), v in res_all.items() if c == case}
            scores = {name: scorer.compute_score(gts, res)[0]
                      for scorer, name in ((meteor, "METEOR"), (Rouge(), "ROUGE_L"), (Cider(), "CIDEr"))}
            scores.update(ms.run_mteval(data_ref, data_sys, data_src))
            results.append({m: "%.4f" % scores[m] for m in METRICS})
        del meteor
    print(json.dumps(results))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
