"""Embedding scorers (likeness, likeness_clip, memorization, adherence, diversity) on tiny random-weight
CLIP and DINOv2 folders, the offline errors, and `lora-monitor models clip|dino`."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import shape_image
from lora_monitor.record import read_image, save_png_atomic
from lora_monitor.scoring.embeddings import (
    DEFAULT_CLIP, DEFAULT_DINO, EmbeddingModel, ModelNotAvailableError, load_embedding_model,
)
from lora_monitor.scoring.signals import (
    AdherenceScorer, DiversityScorer, LikenessScorer, MemorizationScorer, SignalOptions, strip_trigger_words,
)
from lora_monitor.scoring.scorers import get_scorer
from lora_monitor.tiny.embedders import build_tiny_dino, save_tiny_clip

CAPTIONS = ["a red disc", "a blue square", "a green stripe"]


SHAPES = ["disc", "square", "stripe"]


@pytest.fixture
def options(tiny_embedders):
    def make(**kwargs) -> SignalOptions:
        defaults = dict(clip_model=tiny_embedders["clip"], dino_model=tiny_embedders["dino"], device="cpu")
        return SignalOptions(**{**defaults, **kwargs})

    return make



# ---------------------------------------------------------------------------- embedding models

# The preprocessor_config.json files of the default models, as published on the hub.
CLIP_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3, "size": 224,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}
DINO_PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256},
}


@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_preprocessing_matches_the_transformers_image_processor(kind):
    """Our batched torch preprocessing against transformers' own (PIL) image processor, with the real configs.
    They differ by PIL's 8-bit rounding after its resize: a pixel's 1/255 is 0.015-0.017 after normalising."""
    import transformers

    from lora_monitor.record import from_pil, to_pil
    from lora_monitor.scoring.embeddings import Preprocessing

    config, names = ((CLIP_PREPROCESSOR, ("CLIPImageProcessorPil", "CLIPImageProcessor")) if kind == "clip"
                     else (DINO_PREPROCESSOR, ("BitImageProcessorPil", "BitImageProcessor")))
    processor_class = next(getattr(transformers, name) for name in names if hasattr(transformers, name))
    low = torch.rand(1, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    pil = to_pil(torch.nn.functional.interpolate(low, size=(150, 200), mode="bicubic").clamp(0, 1)[0])
    expected = processor_class(**config)(images=pil, return_tensors="pt")["pixel_values"]
    ours = Preprocessing.from_config(config, 224, kind)(from_pil(pil)[None])
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    assert (ours - expected).abs().max() < 0.03
    assert (ours - expected).abs().mean() < 0.01


def test_shared_models_are_released(tiny_embedders):
    from lora_monitor.scoring.embeddings import release_embedding_models

    model = load_embedding_model(tiny_embedders["dino"], "dino", device="cpu")
    assert model.loaded and load_embedding_model(tiny_embedders["dino"], "dino", device="cpu") is model
    release_embedding_models()
    assert not model.loaded
    again = load_embedding_model(tiny_embedders["dino"], "dino", device="cpu")
    assert again is not model and again.loaded
    assert all(not parameter.requires_grad for parameter in again.model.parameters()) and not again.model.training


def test_loading_and_embedding_leave_the_global_rng_alone(tiny_embedders):
    state = torch.random.get_rng_state()
    for kind in ("clip", "dino"):
        model = EmbeddingModel(tiny_embedders[kind], kind, device="cpu").load()
        model.embed_images(torch.stack([shape_image("disc"), shape_image("square")]))
    model = EmbeddingModel(tiny_embedders["clip"], "clip", device="cpu").load()
    model.embed_texts(CAPTIONS)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_precision_on_cuda_agrees_with_the_cpu(tiny_embedders):
    images = torch.stack([shape_image(kind) for kind in SHAPES])
    cpu = EmbeddingModel(tiny_embedders["dino"], "dino", device="cpu").load().embed_images(images)
    cuda = EmbeddingModel(tiny_embedders["dino"], "dino", device="cuda", dtype=torch.float16).load().embed_images(images.cuda())
    assert cuda.dtype == torch.float32 and cuda.device.type == "cuda"
    assert (cuda.cpu() * cpu).sum(dim=1).min() > 0.99


# ---------------------------------------------------------------------------- likeness and memorization


@pytest.mark.parametrize("metric", ["likeness", "likeness_clip"])
def test_an_image_is_perfectly_like_itself(metric, options):
    image = shape_image("disc", size=40)
    scorer = get_scorer(metric, options=options(references=[image]))
    scorer.prepare()
    score = scorer(torch.stack([image, shape_image("square", size=40)]))
    assert score.shape == (2,)
    assert score[0].item() == pytest.approx(1.0, abs=1e-5)
    assert score[1].item() < 1 - 1e-3


def test_memorization_of_a_copied_training_image_is_one(options):
    references = [shape_image(kind) for kind in SHAPES]
    previews = torch.stack([references[1], shape_image("disc", shift=5)])
    memorization = MemorizationScorer(options(references=references))
    likeness = LikenessScorer(options(references=references, top_k=1))
    assert (memorization.higher_is_better, likeness.higher_is_better) == (False, True)
    copied, shifted = memorization(previews).tolist()
    assert copied == pytest.approx(1.0, abs=1e-5)
    assert shifted < 1 - 1e-4
    assert likeness(previews)[0].item() == pytest.approx(1.0, abs=1e-5)
    # top_k=1 likeness is the best match, which is memorization's number
    assert torch.allclose(likeness(previews), memorization(previews), atol=1e-6)


def test_likeness_averages_the_top_k_closest_references(options, tiny_embedders):
    """Against a direct computation: the CLS token of the tiny Dinov2Model on its own preprocessing."""
    from transformers import AutoModel

    image, other = shape_image("disc"), shape_image("square")
    preview = shape_image("disc", shift=3)
    score = LikenessScorer(options(references=[image, other], top_k=2))(preview[None])

    dino = AutoModel.from_pretrained(tiny_embedders["dino"]).eval()
    preprocess = EmbeddingModel(tiny_embedders["dino"], "dino", device="cpu").load().preprocess
    with torch.no_grad():
        cls = dino(pixel_values=preprocess(torch.stack([preview, image, other]))).last_hidden_state[:, 0]
    cls = torch.nn.functional.normalize(cls, dim=-1)
    cosines = cls[1:] @ cls[0]
    assert score.item() == pytest.approx(cosines.mean().item(), abs=1e-5)
    assert abs(cosines[0] - cosines[1]) > 1e-3  # so the mean differs from either one
    # top_k larger than the number of references is capped
    assert LikenessScorer(options(references=[image, other], top_k=10))(preview[None]).item() == pytest.approx(score.item(), abs=1e-6)


def test_scorers_on_one_batch_embed_it_once(options, tiny_embedders):
    references = [shape_image(kind) for kind in SHAPES]
    likeness = LikenessScorer(options(references=references))
    memorization = MemorizationScorer(options(references=references))
    likeness.prepare(), memorization.prepare()
    assert likeness.model is memorization.model  # one shared DINOv2
    calls = []
    hook = likeness.model.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        batch = torch.stack([shape_image("disc", shift=2), shape_image("stripe", shift=-2)])
        likeness(batch), memorization(batch)
        assert len(calls) == 1
        batch.mul_(0.9)  # changed in place: its version moves on, so it is embedded again
        first = memorization(batch)
        assert len(calls) == 2
        assert not torch.allclose(first, memorization(torch.stack([shape_image("disc", shift=2), shape_image("stripe", shift=-2)])))
    finally:
        hook.remove()


# ---------------------------------------------------------------------------- diversity


def test_diversity_is_zero_for_identical_seeds_and_positive_for_different(options):
    scorer = get_scorer("diversity", options=options())
    assert scorer.whole_set and scorer.higher_is_better
    same, disc, square = shape_image("disc"), shape_image("disc"), shape_image("square", size=48)
    scores = scorer.score_set([same, same.clone(), same.clone(), disc, square], [0, 0, 0, 1, 1])
    assert scores[:3] == pytest.approx([0.0] * 3, abs=1e-5)
    assert scores[3] == scores[4] > 1e-3
    embeddings = scorer.model.embed_image_list([disc, square])
    assert scores[3] == pytest.approx(1 - (embeddings[0] @ embeddings[1]).item(), abs=1e-5)
    assert scorer(torch.stack([disc, shape_image("stripe")])).shape == (2,)  # the whole batch as one group


def test_diversity_needs_two_seeds_for_every_prompt(options):
    scorer = DiversityScorer(options())
    scorer.check_groups([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"prompt\(s\) 1, 2 have a single preview.*seeds_per_prompt"):
        scorer.check_groups([0, 0, 1, 2])
    with pytest.raises(ValueError, match="single preview"):
        scorer.score_set([shape_image("disc")] * 3, [0, 0, 1])


# ---------------------------------------------------------------------------- adherence


def test_strip_trigger_words():
    assert strip_trigger_words("a photo of SKS  dog, sks", ["sks"]) == "a photo of dog,"
    assert strip_trigger_words("sksdog and sks-style", ["sks"]) == "sksdog and -style"
    assert strip_trigger_words("<ohwx> man", ["<ohwx>", "  "]) == "man"
    assert strip_trigger_words("  many   spaces ", []) == "many spaces"


def train_tiny_clip(model: EmbeddingModel, images: torch.Tensor, captions: list[str], steps: int = 40) -> None:
    """A few steps of CLIP's contrastive loss so the tiny model matches these captions to these images."""
    clip = model.model
    tokens = model.tokenizer(captions, padding=True, return_tensors="pt")
    pixels = model.preprocess(images)
    clip.requires_grad_(True)
    optimizer = torch.optim.Adam(clip.parameters(), lr=3e-3)
    with torch.enable_grad():
        for _ in range(steps):
            loss = clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels, return_loss=True).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    clip.requires_grad_(False)


def test_adherence_prefers_the_images_own_caption(options, tmp_path):
    folder = str(save_tiny_clip(tmp_path / "clip-trained"))  # its own folder: training changes the shared instance
    images = torch.stack([shape_image(kind) for kind in SHAPES])
    train_tiny_clip(load_embedding_model(folder, "clip", device="cpu"), images, CAPTIONS)

    scorer = get_scorer("adherence", options=options(clip_model=folder))
    assert scorer.needs_prompts and not scorer.needs_reference
    # column j: every image scored against caption j
    table = torch.stack([scorer(images, prompts=[caption] * len(images)) for caption in CAPTIONS], dim=1)
    for row in range(len(CAPTIONS)):
        others = [table[row, column].item() for column in range(len(CAPTIONS)) if column != row]
        assert table[row, row].item() > max(others), f"{SHAPES[row]}: {table[row].tolist()}"
    assert scorer(images, prompts=CAPTIONS).tolist() == pytest.approx(table.diagonal().tolist(), abs=1e-6)

    stripping = get_scorer("adherence", options=options(clip_model=folder, strip_words=("sks",)))
    triggered = [f"SKS {caption}" for caption in CAPTIONS]
    assert stripping(images, prompts=triggered).tolist() == pytest.approx(table.diagonal().tolist(), abs=1e-6)
    assert set(stripping.text_embeddings) == set(CAPTIONS)  # what was embedded: the prompts without the trigger
    assert scorer(images, prompts=triggered).tolist() != pytest.approx(table.diagonal().tolist(), abs=1e-4)
    with pytest.raises(ValueError, match="one prompt per image: 3 images, none"):
        scorer(images)


def test_the_scorers_through_score_images_and_score_sets(options):
    """The monitor's path: per-image scorers batched by size with prompts, whole-set scorers on everything."""
    from lora_monitor.scoring.scorers import score_images, score_sets

    references = [shape_image(kind) for kind in SHAPES]
    names = ["likeness", "memorization", "adherence", "diversity"]
    scorers = [get_scorer(name, options=options(references=references)) for name in names]
    images = [references[0], shape_image("disc", size=40), references[1], shape_image("square", size=40)]
    prompts = ["a red disc", "a red disc", "a blue square", "a blue square"]
    scores = score_images(scorers, images, prompts=prompts)
    assert [scores["memorization"][0], scores["memorization"][2]] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert scores["memorization"][1] < 1 - 1e-4 and scores["memorization"][3] < 1 - 1e-4
    assert all(math.isfinite(value) for value in scores["likeness"] + scores["adherence"])
    assert "diversity" not in scores  # a whole-set scorer: left to score_sets
    diversity = score_sets(scorers, images, [0, 0, 1, 1])["diversity"]
    assert diversity[0] == diversity[1] > 0 and diversity[2] == diversity[3] > 0


# ---------------------------------------------------------------------------- unscorable images and bad input


def test_a_nan_image_scores_nan_and_leaves_the_others_alone(options):
    references = [shape_image(kind) for kind in SHAPES]
    broken = torch.full((3, 32, 32), float("nan"))
    batch = torch.stack([shape_image("disc"), broken])
    for scorer in (LikenessScorer(options(references=references)), MemorizationScorer(options(references=references)),
                   get_scorer("likeness_clip", options=options(references=references))):
        first, second = scorer(batch).tolist()
        assert math.isfinite(first) and math.isnan(second), scorer.name
    assert AdherenceScorer(options())(batch, prompts=CAPTIONS[:2]).isnan().tolist() == [False, True]
    scores = DiversityScorer(options()).score_set([shape_image("disc"), broken, shape_image("disc"), shape_image("square")],
                                                  [0, 0, 1, 1])
    assert math.isnan(scores[0]) and math.isnan(scores[1]) and scores[2] > 0


def test_references_folder(options, tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    with pytest.raises(ValueError, match=f"references folder {folder} holds no images"):
        LikenessScorer(options(references=str(folder))).prepare()
    with pytest.raises(ValueError, match=f"references folder {tmp_path / 'missing'} does not exist"):
        LikenessScorer(options(references=tmp_path / "missing")).prepare()
    with pytest.raises(ValueError, match="compares previews with the training images"):
        LikenessScorer(options()).prepare()
    save_png_atomic(shape_image("square"), folder / "b.png")
    save_png_atomic(shape_image("disc", size=48), folder / "a.PNG")
    (folder / "captions.txt").write_text("not an image")
    scorer = LikenessScorer(options(references=folder, top_k=1))
    scorer.prepare()
    assert scorer.reference_embeddings.shape[0] == 2
    assert scorer(read_image(folder / "a.PNG")[None]).item() == pytest.approx(1.0, abs=1e-5)


def test_options_are_checked():
    with pytest.raises(ValueError, match="top_k must be a whole number >= 1, got 0"):
        SignalOptions(top_k=0)
    with pytest.raises(ValueError, match="unknown option.*topk"):
        LikenessScorer(topk=2)
    assert LikenessScorer(SignalOptions(top_k=5), top_k=2).options.top_k == 2
    assert SignalOptions(strip_words="sks").strip_words == ("sks",)


def test_tiny_models_are_seeded_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, second, other = build_tiny_dino(0), build_tiny_dino(0), build_tiny_dino(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = [dict(model.state_dict()) for model in (first, second, other)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not all(torch.equal(weights[0][name], weights[2][name]) for name in weights[0])


# ---------------------------------------------------------------------------- models not available


def test_a_model_not_in_the_cache_names_the_command_that_fetches_it(empty_hf_cache, options):
    with pytest.raises(ModelNotAvailableError, match="'openai/clip-vit-base-patch32'.*`lora-monitor models clip`"):
        EmbeddingModel(DEFAULT_CLIP, "clip", device="cpu").load()
    with pytest.raises(ModelNotAvailableError, match="`lora-monitor models dino`"):
        get_scorer("diversity", options=SignalOptions(device="cpu")).prepare()
    scorer = get_scorer("adherence", options=options(clip_model="someone/other-clip"))
    with pytest.raises(ModelNotAvailableError, match="`lora-monitor models clip --name someone/other-clip`"):
        scorer.prepare()
    with pytest.raises(ModelNotAvailableError, match="does not hold a CLIP model"):
        EmbeddingModel(str(empty_hf_cache.parent), "clip", device="cpu").load()


def test_importing_the_scorers_does_not_import_transformers():
    code = "import sys, lora_monitor.scoring.signals; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_models_command_offline_without_cache_fails_naming_the_model(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "lora_monitor.cli", "models", "clip"], capture_output=True, text=True, env=env)
    assert result.returncode == 1
    assert DEFAULT_CLIP in result.stderr and "Traceback" not in result.stderr


def test_models_command_checks_a_local_folder(tiny_embedders, capsys):
    from lora_monitor.cli import main

    assert main(["models", "dino", "--name", tiny_embedders["dino"], "--offline"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"DINOv2 model {tiny_embedders['dino']}:") and "32-dimensional" in out
    assert main(["models", "clip", "--name", tiny_embedders["dino"]]) == 1  # a DINOv2 folder is no CLIP model
    assert "does not hold a CLIP model" in capsys.readouterr().err
    assert main(["models", "brisque", "--name", "x"]) == 2


# ---------------------------------------------------------------------------- the real models, where cached


def test_real_models_where_cached():
    """facebook/dinov2-small and openai/clip-vit-base-patch32 from the HF cache (skipped where not fetched)."""
    try:
        dino = load_embedding_model(DEFAULT_DINO, "dino", device="cpu")
        clip = load_embedding_model(DEFAULT_CLIP, "clip", device="cpu")
    except ModelNotAvailableError as error:
        pytest.skip(f"real models not in the HF cache; fetch them with `lora-monitor models dino` and "
                    f"`lora-monitor models clip` ({str(error)[:80]}...)")
    assert dino.preprocess.crop == (224, 224) and clip.preprocess.crop == (224, 224)
    disc, square = shape_image("disc", size=96), shape_image("square", size=96)
    options = SignalOptions(references=[disc], device="cpu")
    assert LikenessScorer(options)(disc[None]).item() == pytest.approx(1.0, abs=1e-4)
    adherence = AdherenceScorer(options)
    images = torch.stack([disc, square])
    right = adherence(images, prompts=["a red circle", "a blue square"])
    wrong = adherence(images, prompts=["a blue square", "a red circle"])
    assert (right > wrong).all(), (right, wrong)
    assert DiversityScorer(options).score_set([disc, square], [0, 0])[0] > 0.05
