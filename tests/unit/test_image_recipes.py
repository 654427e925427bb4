from pathlib import Path

import pytest

from llmhub.fleet import engine, images


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


@pytest.fixture
def seam(monkeypatch):
    """The engine seam's image calls, stubbed: `built` images are present; `stream` is what a build says."""
    calls = type("Seam", (), {"built": set(), "stream": [], "error": None, "builds": []})()

    def image_build(target, *, context, tag, labels):
        calls.builds.append((target, tag, labels, sorted(p.name for p in context.iterdir())))
        yield from calls.stream
        if calls.error:
            raise engine.ImageBuildError(f"building {tag} failed: {calls.error}", calls.error)
        calls.built.add(tag)

    monkeypatch.setattr(engine, "image_present", lambda target, image: image in calls.built)
    monkeypatch.setattr(engine, "image_build", image_build)
    return calls


def test_an_image_is_built_through_the_engine_seam_with_its_steps_as_progress(project, seam):
    seam.stream = [
        "Step 1/2 : FROM scratch\n",
        " ---> Using cache\n",
        "Step 2/2 : COPY \x1b[1mrequirements.lock\x1b[0m /\n",
    ]
    lines = []

    tag = images.engine_image_ensure(target="unix:///engine.sock", recipe="app", progress=lines.append)

    assert tag == images.recipe_tag("app")
    [(target, built, labels, context)] = seam.builds
    assert (target, built) == ("unix:///engine.sock", tag)
    assert labels == {"llmhub.recipe": "app", "llmhub.recipe.hash": tag.rsplit(":", 1)[1]}
    assert context == ["Dockerfile", "project-files", "requirements.lock"]
    steps = [line.split("] ", 1)[1] for line in lines if line.startswith("[")]
    assert steps == ["Step 1/2 : FROM scratch", "  (cached)", "Step 2/2 : COPY requirements.lock /"]
    assert images.engine_image_ensure(target="unix:///engine.sock", recipe="app", progress=lines.append) == tag
    assert len(seam.builds) == 1  # present: not built again


def test_a_failed_build_step_is_named_with_the_log_tail(project, seam):
    seam.stream = ["Step 1/2 : FROM scratch\n", "Step 2/2 : COPY requirements.lock /\n", "copying\n"]
    seam.error = "COPY failed: no space left on device"

    with pytest.raises(images.EngineImageError) as failure:
        images.engine_image_ensure(target="unix:///engine.sock", recipe="app", progress=lambda line: None)

    assert str(failure.value).startswith(
        f"build of {images.recipe_tag('app')} failed at Step 2/2 : COPY requirements.lock /: COPY failed"
    )
    assert failure.value.log_tail[-2:] == ["copying", "COPY failed: no space left on device"]
