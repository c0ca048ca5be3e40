"""The CLIP stage through Beam RunInference gives open_clip's own scores, for every model source.

Tolerance: 1e-5 absolute on cosine similarities. Both sides run float32 on the CPU, but the Beam
stage scores batches of up to 4 images while the reference scores one at a time, so the matrix
products may sum in a different order.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from PIL import Image

from bm6b.filters.clip import ClipThresholds
from bm6b.filters.clip import ClipScorer
from bm6b.models.loading import RANDOM_INIT_SEED, ClipSource, load_clip, load_transforms, resolve_source
from bm6b.pipelines.clip_inference import ClipModelSpec, ClipStageConfig, OpenClipModelHandler
from clip_helpers import CAPTIONS, make_jpeg, make_records, open_clip_model, reference_scores, run_clip_stage

TOLERANCE = 1e-5
TINY = "bm6b-tiny"


def assert_scores_match(kept: dict, expected: dict) -> None:
    assert set(kept) == set(expected)
    for key, languages in expected.items():
        for language in ("zh", "en"):
            score = kept[key].get(f"clip_score_{language}")
            if language in languages:
                assert score == pytest.approx(languages[language], abs=TOLERANCE), (key, language)
            else:
                assert score is None, (key, language)


@pytest.fixture(scope="module")
def records():
    return make_records()


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory):
    """A bm6b-tiny model drawn with seed 7, saved three ways: raw state dict, trainer envelope, folder."""
    folder = tmp_path_factory.mktemp("checkpoints")
    model, _, _ = open_clip_model(TINY, seed=7)
    state_dict = model.state_dict()
    raw = folder / "tiny_seed7.bin"
    torch.save(state_dict, raw)
    envelope = folder / "trainer_style.pt"
    torch.save({"model": {f"module.{k}": v for k, v in state_dict.items()}, "step": 12}, envelope)
    checkpoint_folder = folder / "run"
    checkpoint_folder.mkdir()
    torch.save({"state_dict": state_dict, "epoch": 3}, checkpoint_folder / "epoch_latest.pt")
    return {"raw": raw, "envelope": envelope, "folder": checkpoint_folder}


def stage_config(models: dict, **kwargs) -> ClipStageConfig:
    return ClipStageConfig(models=models, max_batch_size=4, **kwargs)


def test_random_init_matches_open_clip(records, tmp_path):
    spec = ClipModelSpec(TINY)
    kept, rejects = run_clip_stage(records, stage_config({"zh": spec, "en": spec}), tmp_path)

    assert rejects == []
    expected = reference_scores(*open_clip_model(TINY, seed=RANDOM_INIT_SEED), records)
    assert_scores_match(kept, expected)
    assert {r["clip_model"] for r in kept.values()} == {"bm6b-tiny:random-init"}
    # Chinese and English captions both got scores, from the same image embedding.
    assert sum(1 for r in kept.values() if r.get("clip_score_zh") is not None) == 9
    assert sum(1 for r in kept.values() if r.get("clip_score_en") is not None) == 10


@pytest.mark.parametrize("form", ["raw", "envelope", "folder"])
def test_checkpoint_matches_open_clip(records, checkpoint_files, tmp_path, form):
    spec = ClipModelSpec(TINY, str(checkpoint_files[form]))
    kept, rejects = run_clip_stage(records, stage_config({"zh": spec, "en": spec}), tmp_path)

    assert rejects == []
    expected = reference_scores(*open_clip_model(TINY, pretrained=str(checkpoint_files["raw"])), records)
    assert_scores_match(kept, expected)
    model_ids = {r["clip_model"] for r in kept.values()}
    assert len(model_ids) == 1
    file_name = {"raw": "tiny_seed7.bin", "envelope": "trainer_style.pt", "folder": "epoch_latest.pt"}[form]
    assert model_ids.pop().startswith(f"bm6b-tiny:{file_name}@")


def test_checkpoint_differs_from_random_init(records, checkpoint_files):
    random_scores = reference_scores(*open_clip_model(TINY, seed=RANDOM_INIT_SEED), records)
    loaded_scores = reference_scores(*open_clip_model(TINY, pretrained=str(checkpoint_files["raw"])), records)
    key = records[0]["key"]
    assert abs(random_scores[key]["en"] - loaded_scores[key]["en"]) > 1e-3


def test_one_model_per_language(records, checkpoint_files, tmp_path):
    zh_spec = ClipModelSpec(TINY)
    en_spec = ClipModelSpec(TINY, str(checkpoint_files["raw"]))
    kept, _ = run_clip_stage(records, stage_config({"zh": zh_spec, "en": en_spec}), tmp_path)

    zh_expected = reference_scores(*open_clip_model(TINY, seed=RANDOM_INIT_SEED), records)
    en_expected = reference_scores(*open_clip_model(TINY, pretrained=str(checkpoint_files["raw"])), records)
    for key, record in kept.items():
        if "zh" in zh_expected[key]:
            assert record["clip_score_zh"] == pytest.approx(zh_expected[key]["zh"], abs=TOLERANCE)
        if "en" in en_expected[key]:
            assert record["clip_score_en"] == pytest.approx(en_expected[key]["en"], abs=TOLERANCE)

    both = kept[records[0]["key"]]["clip_model"]
    zh_id, en_id = both.split(";")
    assert zh_id == "zh=bm6b-tiny:random-init"
    assert en_id.startswith("en=bm6b-tiny:tiny_seed7.bin@")
    assert kept[records[2]["key"]]["clip_model"] == en_id[3:]  # English caption only
    assert kept[records[3]["key"]]["clip_model"] == "bm6b-tiny:random-init"  # Chinese caption only


def test_undecodable_image_rejected(tmp_path):
    records = make_records(3)
    records[1]["image"] = b"<html>not an image</html>"
    records[2]["image"] = None
    spec = ClipModelSpec(TINY)
    kept, rejects = run_clip_stage(records, stage_config({"zh": spec, "en": spec}), tmp_path)

    assert set(kept) == {records[0]["key"]}
    by_key = {r["key"]: r for r in rejects}
    assert set(by_key) == {records[1]["key"], records[2]["key"]}
    assert {r["stage"] for r in rejects} == {"clip"}
    assert {r["reason"] for r in rejects} == {"decode_error"}
    assert by_key[records[1]["key"]]["detail"] == "CLIP input: cannot decode image: 25 bytes in no format Pillow recognizes"
    assert by_key[records[2]["key"]]["detail"] == "CLIP input: the record has no image bytes"


def test_embeddings_kept_as_float16(records, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bm6b.pipelines.shards import build_parquet
    from bm6b.schemas import new_record

    spec = ClipModelSpec(TINY)
    kept, _ = run_clip_stage(records[:4], stage_config({"zh": spec, "en": spec}, keep_embeddings=True), tmp_path)

    model, preprocess, tokenizer = open_clip_model(TINY, seed=RANDOM_INIT_SEED)
    record = kept[records[0]["key"]]
    assert len(record["clip_image_embedding"]) == 64
    image = preprocess(Image.open(io.BytesIO(records[0]["image"])).convert("RGB"))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_image(image.unsqueeze(0)), dim=-1)[0]
        expected_text = torch.nn.functional.normalize(model.encode_text(tokenizer([records[0]["caption_en"]])), dim=-1)[0]
    assert torch.allclose(torch.tensor(record["clip_image_embedding"]), expected, atol=1e-3)
    assert torch.allclose(torch.tensor(record["clip_text_embedding_en"]), expected_text, atol=1e-3)
    # float16 round trip: every stored value is exactly representable in float16.
    stored = torch.tensor(record["clip_image_embedding"], dtype=torch.float64)
    assert torch.equal(stored, stored.to(torch.float16).to(torch.float64))
    assert "clip_text_embedding_en" not in kept[records[3]["key"]]  # no English caption

    row = new_record(key=record["key"], uid="0" * 32, url="http://127.0.0.1/x.jpg", source="m", source_row=0)
    row.update({k: v for k, v in record.items() if k.startswith("clip_")})
    table = pq.read_table(pa.BufferReader(build_parquet([row])))
    assert table.schema.field("clip_image_embedding").type == pa.list_(pa.float16())
    assert table.column("clip_image_embedding").to_pylist()[0] == record["clip_image_embedding"]


def test_embeddings_off_by_default(records, tmp_path):
    spec = ClipModelSpec(TINY)
    kept, _ = run_clip_stage(records[:2], stage_config({"zh": spec, "en": spec}), tmp_path)
    for record in kept.values():
        assert "clip_image_embedding" not in record
        assert "clip_text_embedding_en" not in record


def test_handler_scores_without_beam(records):
    handler = OpenClipModelHandler(ClipModelSpec(TINY), max_batch_size=4)
    loaded = handler.load_model()
    preprocess, tokenizer = load_transforms(TINY)
    from bm6b.filters.clip import ClipPreprocessor

    examples = [ClipPreprocessor(preprocess, tokenizer).prepare(r)[0] for r in records[:3]]
    predictions = list(handler.run_inference(examples, loaded))
    expected = reference_scores(*open_clip_model(TINY, seed=RANDOM_INIT_SEED), records[:3])
    for prediction, record in zip(predictions, records):
        assert prediction.model_id == "bm6b-tiny:random-init"
        assert prediction.inference["clip_score_en"] == pytest.approx(expected[record["key"]]["en"], abs=TOLERANCE)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 4}
    assert handler.get_num_bytes(examples) == 3 * 3 * 64 * 64 * 4 + (2 + 2 + 1) * 77 * 8


def test_scorer_without_beam(records):
    batch = [dict(r) for r in records[:4]]
    batch[2]["image"] = b"broken"
    failed = ClipScorer(TINY).score_batch(batch)

    assert [(r["key"], reason) for r, (reason, _) in failed] == [(records[2]["key"], "decode_error")]
    expected = reference_scores(*open_clip_model(TINY, seed=RANDOM_INIT_SEED), records[:4])
    for record in (batch[0], batch[1], batch[3]):
        assert record["clip_model"] == "bm6b-tiny:random-init"
        for language, score in expected[record["key"]].items():
            assert record[f"clip_score_{language}"] == pytest.approx(score, abs=TOLERANCE)
    assert "clip_score_en" not in batch[2]


# ---------------------------------------------------------------- loader


def test_pretrained_tag_resolves_without_download():
    # Only the name lookup and the tag's preprocessing settings run here; loading the weights
    # would go through open_clip's hub download.
    assert resolve_source("ViT-B-32", "laion2b_s34b_b79k") == ClipSource("ViT-B-32", pretrained_tag="laion2b_s34b_b79k")
    preprocess, _ = load_transforms("ViT-B-32", "laion2b_s34b_b79k")
    assert preprocess.transforms[0].size == 224


def test_load_transforms_match_load_clip(checkpoint_files):
    _, preprocess, tokenizer, _ = load_clip(TINY, str(checkpoint_files["folder"]))
    light_preprocess, light_tokenizer = load_transforms(TINY, str(checkpoint_files["folder"]))
    image = Image.open(io.BytesIO(make_jpeg(3))).convert("RGB")
    assert torch.equal(preprocess(image), light_preprocess(image))
    assert torch.equal(tokenizer(["一只狗", "a dog"]), light_tokenizer(["一只狗", "a dog"]))


def test_random_init_is_the_same_in_every_load():
    first, _, _, _ = load_clip(TINY)
    second, _, _, _ = load_clip(TINY)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_open_clip_config_folder(tmp_path):
    import open_clip

    model, _, _ = open_clip_model(TINY, seed=3)
    folder = tmp_path / "hub_style"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    config = {"model_cfg": open_clip.get_model_config(TINY), "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))

    loaded, preprocess, _, model_id = load_clip(None, str(folder))
    assert model_id.startswith("hub_style:open_clip_pytorch_model.bin@")
    assert torch.equal(loaded.visual.conv1.weight, model.visual.conv1.weight)
    assert tuple(preprocess.transforms[-1].mean) == (0.5, 0.5, 0.5)


def test_trainer_checkpoint_with_trained_tokenizer(tmp_path):
    from bm6b.train.modeling import build_model
    from bm6b.train.tokenizer import BilingualTokenizer, train_bilingual_tokenizer

    texts = [zh for zh, _ in CAPTIONS if zh] * 20 + [en for _, en in CAPTIONS if en] * 20
    train_bilingual_tokenizer(texts, 320, tmp_path / "tok.json", min_frequency=1)
    tokenizer = BilingualTokenizer(tmp_path / "tok.json", context_length=32)
    torch.manual_seed(5)
    model, _, _ = build_model(TINY, tokenizer)
    torch.save(
        {
            "model": model.state_dict(),
            "config": {"model": TINY, "context_length": 32, "tokenizer": str(tmp_path / "tok.json")},
            "tokenizer_json": (tmp_path / "tok.json").read_text(encoding="utf-8"),
            "step": 1,
        },
        tmp_path / "last.pt",
    )

    loaded, _, loaded_tokenizer, model_id = load_clip(None, str(tmp_path / "last.pt"))
    assert model_id.startswith("bm6b-tiny:last.pt@")
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.context_length == 32
    assert isinstance(loaded_tokenizer, BilingualTokenizer)
    assert torch.equal(loaded_tokenizer(["一只黑狗"]), tokenizer(["一只黑狗"]))
    with torch.no_grad():
        tokens = tokenizer(["一只黑狗在草地上奔跑。"])
        assert torch.allclose(loaded.encode_text(tokens), model.encode_text(tokens), atol=1e-6)

    with pytest.raises(ValueError, match="was trained as model 'bm6b-tiny', not 'ViT-B-32'"):
        load_clip("ViT-B-32", str(tmp_path / "last.pt"))


@pytest.mark.parametrize(
    "model_name, checkpoint_name, error, message",
    [
        ("no-such-model", None, ValueError, "unknown open_clip model config 'no-such-model'"),
        (None, None, ValueError, "a CLIP model config name is required"),
        (TINY, "missing.pt", FileNotFoundError, "neither a file, a folder, nor an open_clip pretrained tag"),
        (TINY, "pickled.pt", ValueError, "cannot read CLIP checkpoint"),
        (TINY, "not_tensors.pt", ValueError, "is not a state dict"),
        (TINY, "wrong_model.pt", ValueError, "does not match the model config"),
        (TINY, "two", ValueError, "contains several checkpoint files"),
        (TINY, "empty", FileNotFoundError, "no checkpoint file"),
    ],
)
def test_loader_errors(tmp_path, model_name, checkpoint_name, error, message):
    torch.save({"model": {}, "payload": io.StringIO("code")}, tmp_path / "pickled.pt")
    torch.save({"model": {"weight": "not a tensor"}}, tmp_path / "not_tensors.pt")
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "wrong_model.pt")
    (tmp_path / "two").mkdir()
    torch.save({}, tmp_path / "two" / "a.pt")
    torch.save({}, tmp_path / "two" / "b.pt")
    (tmp_path / "empty").mkdir()
    checkpoint = str(tmp_path / checkpoint_name) if checkpoint_name else None
    with pytest.raises(error, match=message):
        load_clip(model_name, checkpoint)


def test_device_and_precision_errors():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        load_clip(TINY, precision="fp16")
    with pytest.raises(ValueError, match="unknown CLIP precision 'fp8'"):
        load_clip(TINY, precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_clip(TINY, device="cuda")


def test_bf16_on_cpu_close_to_fp32(records):
    model32, preprocess, tokenizer, _ = load_clip(TINY)
    model16, _, _, _ = load_clip(TINY, precision="bf16")
    from bm6b.filters.clip import ClipPreprocessor, score_examples

    examples = [ClipPreprocessor(preprocess, tokenizer).prepare(r)[0] for r in records[:4]]
    full = score_examples(model32, examples)
    reduced = score_examples(model16, examples)
    for a, b in zip(full, reduced):
        assert set(a) == set(b)
        for field in a:
            assert not math.isnan(b[field])
            assert b[field] == pytest.approx(a[field], abs=0.03)


def test_stage_config_validation():
    spec = ClipModelSpec(TINY)
    with pytest.raises(ValueError, match="no model scores that language"):
        ClipStageConfig(models={"en": spec}, thresholds=ClipThresholds(min_score={"zh": 0.2}))
    with pytest.raises(ValueError, match="one model for both languages"):
        ClipStageConfig(models={"zh": spec, "en": ClipModelSpec("ViT-B-32")}, keep_embeddings=True)
    with pytest.raises(ValueError, match="batch sizes"):
        ClipStageConfig(models={"en": spec}, min_batch_size=8, max_batch_size=4)
    with pytest.raises(ValueError, match="unknown caption language"):
        ClipStageConfig(models={"fr": spec})
