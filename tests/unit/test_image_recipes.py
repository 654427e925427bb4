from pathlib import Path

import pytest

from llmhub.fleet import images


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root with requirements.lock and a recipe `app` naming it in project-files."""
    (tmp_path / "requirements.lock").write_text("django==5.2\n")
    recipe = tmp_path / "workers" / "images" / "app"
    recipe.mkdir(parents=True)
    (recipe / "Dockerfile").write_text("FROM scratch\nCOPY requirements.lock /\n")
    (recipe / "project-files").write_text("# hashed with the recipe\nrequirements.lock\n")
    monkeypatch.setattr(images, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(images, "RECIPES_DIR", tmp_path / "workers" / "images")
    return tmp_path


def test_a_project_file_is_hashed_with_the_recipe_and_copied_into_the_context(project, tmp_path_factory):
    before = images.recipe_hash("app")
    (project / "requirements.lock").write_text("django==5.2.1\n")
    assert images.recipe_hash("app") != before
    context = tmp_path_factory.mktemp("context")
    images._build_context("app", context)
    assert (context / "requirements.lock").read_text() == "django==5.2.1\n"


@pytest.mark.parametrize("name", ["../outside.lock", "missing.lock", "workers"])
def test_a_project_file_outside_the_project_or_missing_is_refused(project, name):
    (project.parent / "outside.lock").write_text("x")
    (project / "workers" / "images" / "app" / "project-files").write_text(name + "\n")
    with pytest.raises(images.EngineImageError, match="not a file of the project"):
        images.recipe_hash("app")


def test_the_compose_recipes_name_the_lock_file_and_engine_recipes_nothing():
    assert images.project_files("platform-base") == [Path("requirements.lock")]
    assert images.project_files("fake-engine") == []
