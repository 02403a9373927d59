"""The docs site's hook for links from docs/ into the rest of the repository, and the README's
length (a first page, not a manual). `make docs` builds the site itself, in strict mode."""

import importlib.util
import logging
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("repository_links",
                                              REPO / "docs" / "hooks" / "repository_links.py")
links = importlib.util.module_from_spec(spec)
spec.loader.exec_module(links)


def render(markdown, *, page="methods.md", repo_url=None):
    page = types.SimpleNamespace(file=types.SimpleNamespace(src_uri=page))
    config = {"docs_dir": str(REPO / "docs"), "repo_url": repo_url}
    return links.on_page_markdown(markdown, page, config, files=None)


def test_a_repository_link_becomes_its_text_without_a_repository_url():
    assert render("see [dist.py](../kdjax/losses/dist.py).") == "see dist.py."


def test_a_repository_link_points_at_the_repository_host_when_configured():
    url = "https://example.org/kdjax"
    assert render("[dist](../kdjax/losses/dist.py#L3)", repo_url=url + "/") == (
        f"[dist]({url}/blob/main/kdjax/losses/dist.py#L3)")
    assert render("[refs](../tests/references/)", repo_url=url) == (
        f"[refs]({url}/tree/main/tests/references/)")
    assert render("[losses](../../kdjax/losses/)", page="api/losses.md", repo_url=url) == (
        f"[losses]({url}/tree/main/kdjax/losses/)")


def test_links_within_the_docs_and_to_the_web_and_code_are_left_alone():
    text = ("[install](install.md#pytorch) [top](#top) [jax](https://jax.dev) "
            "![plot](plot.png)\n```\n[not a link](../kdjax/nothing.py)\n```\n")
    assert render(text) == text


def test_a_link_to_a_missing_repository_file_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mkdocs.plugins.kdjax"):
        render("[gone](../kdjax/losses/gone.py)")
    assert "links to '../kdjax/losses/gone.py', which is not in the repository" in caplog.text


@pytest.mark.parametrize("page", ["index.md", "install.md", "losses.md", "trainer-api.md"])
def test_the_site_pages_are_in_the_nav(page):
    assert f": {page}" in (REPO / "mkdocs.yml").read_text()


def test_the_readme_is_a_first_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
