"""Recipes: loading, checking, command-line precedence, and each bundled recipe on the bundled sample."""

from __future__ import annotations

import json

import pytest

from bm6b.cli import build_parser, main
from bm6b.recipes import RecipeError, bundled_names, load_recipe, recipe_defaults

BUNDLED = ["bm6b-default", "datacomp-basic", "laion2b-like", "wukong-like"]


def curate_parser():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return parser, subparsers.choices["curate"]


def parse(*args: str):
    parser, _ = curate_parser()
    namespace, extra = parser.parse_known_args(["curate", "in.tsv", "-o", "out", *args])
    return namespace, extra


def test_bundled_recipes_listed():
    assert bundled_names() == BUNDLED


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipe_applies_to_curate(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.description
    assert recipe.sources
    _, curate = curate_parser()
    defaults = recipe_defaults(recipe, curate)
    assert defaults == recipe.options


def test_recipe_sets_defaults():
    args, extra = parse("--recipe", "datacomp-basic")
    assert args.min_image_size == 200
    assert args.max_aspect_ratio == 3.0
    assert args.image_size == 256  # not in the recipe: the parser default
    assert extra == []


def test_flags_override_recipe_either_order():
    after, _ = parse("--recipe", "datacomp-basic", "--min-image-size", "100")
    before, _ = parse("--min-image-size", "100", "--recipe=datacomp-basic")
    assert after.min_image_size == 100
    assert before.min_image_size == 100
    assert after.max_aspect_ratio == 3.0
    assert before.max_aspect_ratio == 3.0


def test_parser_defaults_restored_after_parse():
    parser, curate = curate_parser()
    parser.parse_known_args(["curate", "in.tsv", "-o", "out", "--recipe", "datacomp-basic"])
    assert curate.get_default("min_image_size") == 0
    plain, _ = parser.parse_known_args(["curate", "in.tsv", "-o", "out"])
    assert plain.min_image_size == 0


def test_beam_options_pass_through_with_recipe():
    args, extra = parse("--recipe", "bm6b-default", "--runner", "DataflowRunner", "--region", "europe-west4")
    assert extra == ["--runner", "DataflowRunner", "--region", "europe-west4"]
    assert args.min_image_size == 64


def test_recipe_file_converts_types(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\noptions:\n  min_image_size: '150'\n  overwrite: true\n  allow_network: 127.0.0.0/8\n"
        "  resize_mode: 'no'\n",
        encoding="utf-8",
    )
    args, _ = parse("--recipe", str(path), "--allow-network", "::1/128")
    assert args.min_image_size == 150
    assert args.overwrite is True
    assert args.resize_mode == "no"
    assert args.allow_network == ["127.0.0.0/8", "::1/128"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("options:\n  min_clip_scroe: 0.3\n", "unknown option 'min_clip_scroe'"),
        ("options:\n  output: /tmp/x\n", "unknown option 'output'"),
        ("options:\n  min_image_size: big\n", "option min_image_size (--min-image-size): invalid value 'big'"),
        ("options:\n  resize_mode: crop\n", "invalid value 'crop'; choose from keep_ratio, no"),
        ("options:\n  overwrite: 'yes'\n", "option overwrite (--overwrite): expected true or false"),
        ("options:\n  min_image_size: true\n", "expected a number or string, got True"),
        ("option:\n  min_image_size: 1\n", "unknown top-level key 'option'"),
        ("options: [1, 2]\n", "'options' must be a mapping"),
        ("- a\n- b\n", "expected a mapping"),
        ("options: {min_image_size: [\n", "invalid YAML"),
    ],
)
def test_bad_recipe_names_the_problem(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        parse("--recipe", str(path))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_recipe_lists_bundled(capsys):
    with pytest.raises(SystemExit):
        parse("--recipe", "laion5b")
    err = capsys.readouterr().err
    assert "unknown recipe 'laion5b'" in err
    assert "datacomp-basic" in err


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(str(tmp_path / "nope.yaml"))


# ---------------------------------------------------------------- the bundled sample


@pytest.fixture(scope="module")
def sample_manifest(tmp_path_factory):
    from bm6b.pipelines.demo import SampleServer, write_sample_manifest

    path = tmp_path_factory.mktemp("sample") / "manifest.tsv"
    with SampleServer() as server:
        rows = write_sample_manifest(path, server)
        yield path, rows


def run_recipe(manifest, output, *args: str) -> dict:
    code = main(["curate", str(manifest), "-o", str(output), "--allow-network", "127.0.0.0/8", *args])
    assert code == 0
    return json.loads((output / "stats.json").read_text())


# Counted by hand from bm6b/sample/captions.tsv and the demo manifest (33 rows):
# 10 rows fail for every recipe: 2 at ingest (no URL, ftp://), 6 at download (404, connection
# refused, Word document and broken PNG as not_an_image, truncated JPEG, decompression bomb),
# 1 at captions (sklearn_flower.jpg has no caption), 1 duplicate (the cat photo under a second URL).
# That leaves 23. Shorter sides of those 23 originals below 200 px: pillow_hopper_orientation_6 128,
# pillow_pil_sample_cmyk 100, pillow_transparent 150, skimage_microaneurysms 102, skimage_text 172;
# none below 64. The largest aspect ratio is skimage_text, 448 x 172 = 2.6, so max 3.0 drops none.
COMMON_REJECTS = {"invalid_url": 1, "missing_url": 1, "http_404": 1, "connect": 1, "not_an_image": 2,
                  "decode_error": 1, "decompression_bomb": 1, "empty_caption": 1, "duplicate_image": 1}
EXPECTED = {
    "bm6b-default": (23, {}),
    "datacomp-basic": (18, {"too_small": 5}),
    "wukong-like": (18, {"too_small": 5}),
    "laion2b-like": (23, {}),
}


@pytest.mark.parametrize("name", BUNDLED)
def test_recipe_on_bundled_sample(sample_manifest, tmp_path, name):
    manifest, rows = sample_manifest
    # ViT-B-32 without weights is slow on a CPU and scores nothing real: the flag overrides it.
    extra = ["--clip-model", "bm6b-tiny"] if name == "laion2b-like" else []
    stats = run_recipe(manifest, tmp_path / "out", "--recipe", name, *extra)

    kept, extra_rejects = EXPECTED[name]
    assert rows == 33
    assert stats["input_rows"] == 33
    assert stats["kept"] == kept
    assert stats["rejected"] == 33 - kept
    assert stats["rejects_by_reason"] == {**COMMON_REJECTS, **extra_rejects}
    assert stats["clip_model"] == ("bm6b-tiny" if name == "laion2b-like" else None)
