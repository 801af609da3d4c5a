"""README.md: at most 300 lines, and every relative link resolves to a file of the repository
(and a #fragment to a heading of that file)."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path):
    return {_slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def _relative_links(text: str):
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_readme_is_at_most_300_lines():
    assert len(README.read_text().splitlines()) <= 300


def test_every_relative_readme_link_resolves():
    links = _relative_links(README.read_text())
    assert links  # the README links its docs
    broken = []
    for link in links:
        target, _, fragment = link.partition("#")
        path = (README.parent / target).resolve() if target else README
        if not path.is_file() or not path.is_relative_to(REPO):
            broken.append(link)
        elif fragment and path.suffix == ".md" and fragment not in _anchors(path):
            broken.append(link)
    assert broken == []


def test_link_checker_finds_a_broken_link():
    assert _relative_links("[a](docs/x.md) [b](https://x.org/y) [c](#sec)") == ["docs/x.md", "#sec"]
    assert _slug(" Main job: each loss at its best learning rate (LR sweep)") == \
        "main-job-each-loss-at-its-best-learning-rate-lr-sweep"
