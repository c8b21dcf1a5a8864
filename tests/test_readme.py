"""The project stands alone and its README tells the truth about its files: no file sends a reader to a folder
outside the repository, and the README's file table names files that exist, with their real line counts."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_files():
    """Every file git tracks or would track (untracked but not ignored), with text in it."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout (an unpacked archive): walk the tree
        return [os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, files in os.walk(ROOT)
                if not any(part.startswith(".") for part in os.path.relpath(d, ROOT).split(os.sep) if part != ".")
                for f in files]
    return [f for f in listed.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


def test_no_file_needs_a_folder_beside_the_checkout():
    # The team keeps notes in a folder beside its checkouts; a clone has none, so nothing may point there.
    outside = re.compile(r"\.\./shared|(?<![\w/])reference/(llava|evaluation|performance|platform|instructblip|style)"
                         r"\.md|DESIGN\.md")
    offenders = []
    for name in project_files():
        if name.endswith((".py", ".md", ".txt", ".sh", ".json", ".toml", ".cfg")) or "/" not in name:
            try:
                with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, IsADirectoryError):
                continue
            offenders += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if outside.search(line)
                          and name != "tests/test_readme.py"]
    assert not offenders, f"these lines send a reader outside the project: {offenders}"


def test_readme_file_table_matches_the_files():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    rows = re.findall(r"^\| `([^`]+)` \| *(\d*) *\|", readme, flags=re.M)
    assert len(rows) >= 10, "the README's file table was not found"
    for name, lines in rows:
        path = os.path.join(ROOT, name)
        assert os.path.exists(path), f"README's file table names {name}, which does not exist"
        if lines:
            with open(path, encoding="utf-8") as f:
                actual = sum(1 for _ in f)
            assert int(lines) == actual, f"README says {name} has {lines} lines; it has {actual}"
