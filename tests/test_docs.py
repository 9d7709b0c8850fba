"""The docs stay true: the configuration reference is generated, and links point at files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fedtune.fl import config_reference
from fedtune.fl.config import FLConfig

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "configuration.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Markdown links and images: ](target) with an optional #anchor or "title".
_LINK = re.compile(r"\]\(([^)\s#]*)(?:#[^)\s]*)?(?:\s+\"[^\"]*\")?\)")


def test_configuration_reference_is_up_to_date():
    assert REFERENCE.read_text(encoding="utf-8") == config_reference.render(), (
        f"docs/configuration.md is stale; regenerate it: {config_reference.COMMAND}"
    )


def test_configuration_reference_documents_every_key():
    text = REFERENCE.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)
    documented = set()
    for part in sections[1:]:
        heading, _, body = part.partition("\n")
        section = heading.strip("`[] ")
        documented |= {f"{section}.{key}" for key in re.findall(r"^\| `(\w+)` \|", body, re.M)}
    missing = sorted(set(FLConfig().flat()) - documented)
    assert not missing, f"not in docs/configuration.md: {missing}"


def test_every_key_has_a_docstring():
    missing = [
        f"{section}.{key}"
        for section, field in FLConfig.model_fields.items()
        for key, info in field.annotation.model_fields.items()
        if not info.description
    ]
    assert not missing, f"add a docstring under these fields in fl/config.py: {missing}"


def _relative_links(page: Path) -> list[str]:
    targets = _LINK.findall(page.read_text(encoding="utf-8"))
    return [t for t in targets if t and not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(page):
    broken = [t for t in _relative_links(page) if not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_docs_pages_exist_and_readme_links_to_each():
    readme_links = set(_relative_links(ROOT / "README.md"))
    for name in ["configuration", "privacy", "operations", "benchmarks", "architecture"]:
        assert (ROOT / "docs" / f"{name}.md").is_file()
        assert f"docs/{name}.md" in readme_links, f"README does not link to docs/{name}.md"


def test_the_worker_config_for_hand_started_workers_is_the_local_clusters():
    """``deployments/dask-worker.yaml`` (for ``dask worker`` started by hand) gives the worker
    processes the allocator settings that ``runner.n_workers``' cluster gives its own, as Dask
    itself reads the file."""
    import dask.config
    from fedtune.flows.dask_runner import WORKER_ENVIRON

    path = ROOT / "deployments" / "dask-worker.yaml"
    [loaded] = list(dask.config.collect_yaml([str(path)]))
    environ = loaded["distributed"]["nanny"]["pre-spawn-environ"]
    assert environ == WORKER_ENVIRON
    assert "DASK_CONFIG=deployments/dask-worker.yaml dask worker" in path.read_text()
