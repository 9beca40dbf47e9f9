"""The documentation stays true to the repository: links, anchors and file paths exist, the README
stays short and holds the quick start, the parameter and plan tables match the code, and the
README names no commit."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from xattn_vlm.plan import report

REPO = pathlib.Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
QUICK_START = (
    "bash .ci/setup && .venv/bin/python -m xattn_vlm.recipe "
    "--config=experiments/shapes_tiny.py --workdir=runs/shapes_tiny",
    "bash .ci/run",
)

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
# A repository path: a top-level folder of this repository, then path characters. A path
# followed by "<", "{" or "*" is a pattern (experiments/<name>.py), not a file.
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:xattn_vlm|experiments|benchmarks|launch|docs|tests)/[\w./-]*)(?![<{*])")
COMMIT = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")


def page_id(path: pathlib.Path) -> str:
  return str(path.relative_to(REPO))


def code_of(text: str) -> list[str]:
  """The inline code spans and fenced code blocks of a Markdown text."""
  blocks = FENCE.findall(text)
  return blocks + INLINE_CODE.findall(FENCE.sub("", text))


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
  """Every heading anchor of a Markdown file, duplicates numbered as GitHub does."""
  seen: dict[str, int] = {}
  result = set()
  for line in FENCE.sub("", path.read_text()).splitlines():
    match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not match:
      continue
    base = slug(match.group(1))
    count = seen.get(base, 0)
    seen[base] = count + 1
    result.add(base if count == 0 else f"{base}-{count}")
  return result


def table_after(text: str, first_line_start: str) -> str:
  """The Markdown table whose header line starts with ``first_line_start``."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(first_line_start))
  end = start
  while end < len(lines) and lines[end].startswith("|"):
    end += 1
  return "\n".join(lines[start:end])


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_and_their_anchors_exist(page):
  text = FENCE.sub("", page.read_text())
  broken = []
  for target in LINK.findall(text):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
      continue
    path_part, _, anchor = target.partition("#")
    resolved = (page.parent / path_part).resolve() if path_part else page
    if not resolved.exists():
      broken.append(f"{target}: {resolved} does not exist")
    elif anchor and (resolved.is_dir() or anchor not in anchors(resolved)):
      broken.append(f"{target}: no heading with anchor #{anchor} in {page_id(resolved)}")
  assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_repository_paths_in_code_exist(page):
  missing = set()
  for code in code_of(page.read_text()):
    for path in REPO_PATH.findall(code):
      path = path.rstrip(".")
      if not (REPO / path).exists():
        missing.add(path)
  assert not missing, f"{page_id(page)} names files that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_tests_exist(page):
  """``tests/test_x.py::test_name`` names a test function; a bare ``::test_name`` that follows
  names one in the test file named last."""
  missing = []
  current = None
  for code in INLINE_CODE.findall(FENCE.sub("", page.read_text())):
    match = re.fullmatch(r"(tests/\w+\.py)?::(\w+)", code)
    if code.startswith("tests/") and code.endswith(".py"):
      current = code
    if not match:
      continue
    current = match.group(1) or current
    if current is None or not (REPO / current).exists():
      missing.append(f"{code} (no test file before it)")
    elif not re.search(rf"^def {match.group(2)}\(", (REPO / current).read_text(), re.MULTILINE):
      missing.append(f"{current}::{match.group(2)}")
  assert not missing, f"{page_id(page)} names tests that do not exist: {missing}"


def test_readme_is_short_and_holds_the_quick_start_verbatim():
  lines = README.read_text().splitlines()
  assert len(lines) <= 200, f"README.md has {len(lines)} lines; keep it to 200 (details: docs/)"
  for command in QUICK_START:
    assert command in lines, f"README.md lacks the quick-start line {command!r}"


def test_readme_names_no_commit():
  found = COMMIT.findall(README.read_text())
  assert not found, f"README.md names commits {found}: keep history in git and CHANGELOG.md"


def test_parameter_table_is_what_summary_prints():
  """In a fresh process: ``xattn_vlm.summary`` defines flags that a benchmark imported by other
  tests defines too, and absl refuses a flag defined twice."""
  code = ("from xattn_vlm import summary; from xattn_vlm.models import config; "
          "print(summary.table(list(config.PRESETS)))")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  expected = done.stdout.strip("\n")
  documented = table_after((REPO / "docs/model.md").read_text(), "| config | LM (frozen)")
  assert documented == expected, (
      "docs/model.md's parameter table differs from `python -m xattn_vlm.summary`; paste its "
      f"output:\n{expected}")


def test_plan_table_header_is_the_reports():
  text = (REPO / "docs/planning.md").read_text()
  header = "\n".join(table_after(text, "| config | topology").splitlines()[:2])
  assert header == report.table_header()
