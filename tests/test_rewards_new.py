"""Detection (GenEval-style), OCR and VLM-judge scorers: hand-checked arithmetic on hand-made inputs, and each tiny
random checkpoint (reward_factory_new.py) loaded with from_pretrained and scoring a batch through the registry."""

from __future__ import annotations

import pytest
import reward_factory as rf
import reward_factory_new as rn
import torch

from diffalign.rewards import load_scorer
from diffalign.rewards.requirements import Box, Item, check, parse_prompt, relative_position

# ---- GenEval-style requirements ------------------------------------------------------------------------------------


def test_parse_geneval_templates():
    assert parse_prompt("a photo of a dog") == [Item("dog", 1)]
    assert parse_prompt("a photo of three cats") == [Item("cats", 3)]
    assert parse_prompt("a photo of a red car and a blue bench") == [Item("car", 1, "red"), Item("bench", 1, "blue")]
    # GenEval order: the target first, the relation on the second item
    assert parse_prompt("a photo of a cat left of a dog") == [Item("dog"), Item("cat", 1, None, "left of", 0)]
    with pytest.raises(ValueError, match="a cat riding"):
        parse_prompt("a cat riding a bicycle through paris")


def _box(noun, x0, y0, x1, y1, colour=None):
    return Box(noun, 0.9, (x0, y0, x1, y1), colour)


def test_count_requirement_met_and_missed():
    """two dogs: 2 boxes meet it (1.0); 3 boxes miss it: strict 0, partial 1 - |2-3|/2 = 0.5."""
    items = parse_prompt("a photo of two dogs")
    two = [_box("dogs", 0, 0, 10, 10), _box("dogs", 20, 0, 30, 10)]
    assert check(items, two) == (True, 1.0)
    assert check(items, [*two, _box("dogs", 40, 0, 50, 10)]) == (False, 0.5)
    assert check(items, []) == (False, 0.0)  # 1 - 2/2


def test_colour_requirement():
    """red car + blue bench; the bench is green: terms car 1, red 1, bench 1, blue 1-|1-0|/1 = 0 -> 3/4."""
    items = parse_prompt("a photo of a red car and a blue bench")
    good = [_box("car", 0, 0, 10, 10, "red"), _box("bench", 20, 0, 30, 10, "blue")]
    assert check(items, good) == (True, 1.0)
    bad = [good[0], _box("bench", 20, 0, 30, 10, "green")]
    assert check(items, bad) == (False, 0.75)
    # no bench at all: its count term 0 and its colour term 0 -> (1 + 1 + 0 + 0) / 4
    assert check(items, good[:1]) == (False, 0.5)


def test_position_requirement_by_hand():
    """cat (0,0,10,10) vs dog (30,0,40,10): centre offset x = 5 - 35 = -30, shrunk by 0.1·(10+10) = 2 -> -28;
    dx = -28/30 = -0.93 < -0.5 -> "left of". Swapped: "right of", the position term is 0 -> (1 + 1 + 0)/3."""
    cat, dog = _box("cat", 0, 0, 10, 10), _box("dog", 30, 0, 40, 10)
    assert relative_position(cat, dog) == {"left of"}
    assert relative_position(_box("cat", 0, 0, 10, 10), _box("dog", 1, 0, 11, 10)) == set()  # |offset| 1 < 2
    assert relative_position(_box("cat", 0, 0, 10, 10), _box("dog", 30, 30, 40, 40)) == {"left of", "above"}
    items = parse_prompt("a photo of a cat left of a dog")
    assert check(items, [cat, dog]) == (True, 1.0)
    strict, partial = check(items, [_box("cat", 30, 0, 40, 10), _box("dog", 0, 0, 10, 10)])
    assert not strict and partial == pytest.approx(2 / 3)
    strict, partial = check(items, [cat])  # no target: dog count 0, cat count 1, position 0
    assert not strict and partial == pytest.approx(1 / 3)


def test_toy_fidelity_shares_the_share():
    from diffalign.rewards.requirements import share_met
    from diffalign.rewards.toy import fidelity
    from diffalign.toy import shapes

    scene = shapes.sample_scene(__import__("numpy").random.default_rng(0), {"colour": "red", "shape": "circle"})
    image = shapes.render(scene)
    assert fidelity(image, scene.caption) == share_met([1.0] * 4) == 1.0
    assert fidelity(image, "a blue circle") == share_met([0.0, 1.0]) == 0.5


@pytest.fixture(scope="module")
def geneval_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval")
    owl = rn.build_owlv2(root)
    clip, processor = rf.build_hf_clip(root, steps=5)
    return dict(model=str(owl), colour_model=str(clip), colour_processor=str(processor))


def test_geneval_tiny_owlv2_scores_a_batch(geneval_ckpt):
    """The tiny random OWLv2 loads from disk; scores equal `check` on the scorer's own detections."""
    from diffalign.rewards.geneval import to_pil

    scorer = load_scorer("geneval", threshold=0.3, counting_threshold=0.3, batch_size=2, **geneval_ckpt)
    prompts = ["a photo of a dog", "a photo of two cats", "a photo of a red car left of a blue bench"]
    images = rf.colour_images(["red", "blue", "green"], size=(40, 48))
    scores = scorer(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    items = [parse_prompt(p) for p in prompts]
    nouns = [list(dict.fromkeys(i.noun for i in its)) for its in items]
    boxes = scorer.detect(to_pil(images), nouns, [0.3] * 3)
    assert sum(len(b) for b in boxes) > 0  # the random detector does fire at 0.3
    assert all(b.colour is not None for bs in boxes for b in bs)
    assert scores.tolist() == pytest.approx([check(i, b)[1] for i, b in zip(items, boxes)])
    strict = load_scorer("geneval", mode="strict", threshold=0.3, counting_threshold=0.3, **geneval_ckpt)
    assert strict(images, prompts).tolist() == [float(check(i, b)[0]) for i, b in zip(items, boxes)]


# ---- OCR ---------------------------------------------------------------------------------------------------------


def test_ocr_edit_distance_by_hand():
    """kitten -> sitting: k->s, e->i, +g = 3 edits; reward 1 - 3/7. Containment scores 1; the distance is capped."""
    from diffalign.rewards.ocr import levenshtein, ocr_reward, quoted_text

    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert ocr_reward("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert ocr_reward("Open 24 Hours!", "open 24 hours") == 1.0  # case and spaces ignored, contained
    assert ocr_reward("xxxxxxxxxxxx", "ab") == 0.0  # d = 12 capped at len("ab") = 2
    assert ocr_reward("", "ab") == 0.0
    assert quoted_text('a neon sign that says "Hello World" at night') == "Hello World"
    with pytest.raises(ValueError, match="double quotes"):
        quoted_text("a neon sign at night")


def test_ocr_tiny_trocr_scores_a_batch(tmp_path):
    from diffalign.rewards.ocr import ocr_reward

    scorer = load_scorer("ocr", model=str(rn.build_trocr(tmp_path)), max_new_tokens=6, batch_size=2)
    images = rf.colour_images(["red", "blue", "green"], size=(40, 48))
    reads = scorer.read(images)
    assert len(reads) == 3 and all(reads)  # the random decoder does emit characters
    scores = scorer(images, ['a sign that says "OPEN"'] * 3)
    assert scores.shape == (3,) and scores.tolist() == pytest.approx([ocr_reward(r, "OPEN") for r in reads])
    target = reads[0].replace(" ", "")[:3]  # text the model does read -> contained -> 1.0
    assert '"' not in target and scorer(images[:1], [f'a sign that says "{target}"']).item() == 1.0


# ---- VLM judge ---------------------------------------------------------------------------------------------------


def test_p_yes_from_set_logits():
    """logits yes 2, no 0 -> e^2 / (e^2 + 1) = 0.880797; equal -> 0.5; other tokens do not matter."""
    from diffalign.rewards.vlm_judge import p_yes

    logits = torch.full((3, 5), -1.0)
    logits[0, 1], logits[0, 3] = 2.0, 0.0  # yes id 1, no id 3
    logits[1, 1], logits[1, 3] = 0.5, 0.5
    logits[2, 1], logits[2, 3], logits[2, 0] = -3.0, 1.0, 50.0  # a huge other logit changes nothing
    torch.testing.assert_close(p_yes(logits, 1, 3), torch.tensor([0.880797, 0.5, 0.017986]), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return str(rn.build_qwen2_vl(tmp_path_factory.mktemp("qwen")))


def test_vlm_judge_tiny_qwen2_vl(qwen):
    """Loads from disk; P(yes) = sigmoid(l_yes - l_no) of the model's own logits; batch of 3 (left-padded, prompts of
    different lengths) = one by one; with the yes and no rows of lm_head set equal the judge says exactly 0.5."""
    judge = load_scorer("vlm_judge", model=qwen, batch_size=3)
    images = rf.colour_images(["red", "blue", "green"], size=(40, 48))
    prompts = ["a dog", "a red car left of a blue bench", "two cats"]
    scores = judge(images, prompts)
    assert scores.shape == (3,) and ((scores > 0) & (scores < 1)).all()
    logits = judge.answer_logits(images, prompts)
    torch.testing.assert_close(scores, torch.sigmoid(logits[:, judge.yes_id] - logits[:, judge.no_id]))
    one_by_one = torch.cat([judge(images[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=1e-5)
    assert judge.processor.tokenizer.decode([judge.yes_id]) == "Yes"
    custom = load_scorer("vlm_judge", model=qwen, template="Is this {prompt}? Answer Yes or No.")
    assert "Is this a dog? Answer Yes or No." in custom.question("a dog")
    with torch.no_grad():
        w = judge.model.lm_head.weight
        w[judge.yes_id] = w[judge.no_id]
    torch.testing.assert_close(judge(images, prompts), torch.full((3,), 0.5))


def test_vlm_judge_bad_answer_word_names_it(qwen):
    with pytest.raises(ValueError, match="'Maybe' is 5 tokens"):
        load_scorer("vlm_judge", model=qwen, yes="Maybe")


# ---- ImageReward -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagereward(tmp_path_factory):
    return rn.build_imagereward(tmp_path_factory.mktemp("ir"))


def test_imagereward_official_format_matches_the_blip_reference(imagereward):
    """ImageReward.score by hand on the modules the checkpoint was written from (timm ViT = BLIP's ViT, BERT with
    cross-attention, MLP): tokens padded to 35, [CLS] -> MLP -> (r - 0.16717) / 1.03334."""
    ir = imagereward
    scorer = load_scorer("imagereward", checkpoint=ir["safetensors"], med_config=ir["med_config"],
                         tokenizer=str(ir["tokenizer"]), vision_heads=4, batch_size=2)  # fmt: skip
    images = rf.colour_images(["red", "blue", "green"], size=(40, 48))
    prompts = ["a photo of a red square", "a dog", "a blue cat"]
    got = scorer(images, prompts)
    with torch.no_grad():
        pixels = scorer.preprocess(images)
        embeds = ir["vit"].forward_features(pixels)  # (3, 17, 32)
        tok = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        assert tok.input_ids.shape == (3, 35)
        hidden = ir["text"](input_ids=tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=embeds,
                            encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).last_hidden_state  # fmt: skip
        expected = (ir["mlp"](hidden[:, 0]).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.shape == (3,) and got.std() > 0
    pt = load_scorer("imagereward", checkpoint=ir["pt"], med_config=ir["med_config"], tokenizer=str(ir["tokenizer"]),
                     vision_heads=4, allow_pickle=True)  # fmt: skip
    torch.testing.assert_close(pt(images, prompts), got, atol=0, rtol=0)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_scorer("imagereward", checkpoint=ir["pt"], med_config=ir["med_config"], tokenizer=str(ir["tokenizer"]))


def test_imagereward_rejects_another_checkpoint(tmp_path, imagereward):
    from safetensors.torch import save_file

    save_file({"layers.0.weight": torch.zeros(2, 2)}, tmp_path / "aesthetic.safetensors")
    with pytest.raises(ValueError, match="not an ImageReward checkpoint"):
        load_scorer("imagereward", checkpoint=tmp_path / "aesthetic.safetensors", med_config=imagereward["med_config"])


# ---- HPSv3 -------------------------------------------------------------------------------------------------------


def test_hpsv3_smart_resize_by_hand():
    """1024x768 to 256·28² = 200704 px: rounded 1036x756 is too big; beta = sqrt(786432/200704) = 1.9795,
    floor(1024/1.9795/28) = floor(18.47) -> 504, floor(768/1.9795/28) = floor(13.86) -> 364: 504x364 (183456 px)."""
    from diffalign.rewards.hpsv3 import smart_resize

    assert smart_resize(1024, 768, 28, 256 * 28 * 28) == (504, 364)
    assert smart_resize(448, 448, 28, 256 * 28 * 28) == (448, 448)


def test_hpsv3_official_format_matches_the_reward_model_forward(tmp_path):
    """Loaded from the old-layout checkpoint + the base's config/processor: μ equals upstream's forward by hand
    (language model with positions 0..L-1, head on the <|Reward|> hidden state, first output) on the from_pretrained
    model the checkpoint was written from."""
    from diffalign.rewards.hpsv3 import INSTRUCTION, RATING

    ckpt = rn.build_hpsv3(tmp_path)
    scorer = load_scorer("hpsv3", checkpoint=ckpt["checkpoint"], base=str(ckpt["base"]), pixels=24 * 24,
                         dtype=torch.float32, batch_size=2)  # fmt: skip
    images = rf.colour_images(["red", "blue", "green"], size=(40, 48))
    prompts = ["a dog", "a red car left of a blue bench", "two cats"]
    got = scorer(images, prompts)
    assert got.shape == (3,) and got.std() > 0
    proc = scorer.processor
    from diffalign.rewards.geneval import to_pil

    pils = [im.resize((24, 16), resample=3) for im in to_pil(images)]  # smart_resize(40, 48, 8, 576) = (16, 24)
    assert [p.size for p in pils] == [scorer.resize(im).size for im in to_pil(images)]
    expected = []
    for im, p in zip(pils, prompts):
        turn = [{"type": "image"}, {"type": "text", "text": INSTRUCTION.format(text_prompt=p) + RATING}]
        text = proc.apply_chat_template(
            [{"role": "user", "content": turn}], add_generation_prompt=True, tokenize=False
        )
        inputs = proc(text=[text], images=[im], return_tensors="pt")
        with torch.no_grad():
            embeds = ckpt["model"].model.get_input_embeddings()(inputs.input_ids)
            image = ckpt["model"].model.get_image_features(inputs.pixel_values, inputs.image_grid_thw).pooler_output
            embeds[inputs.input_ids == ckpt["model"].config.image_token_id] = torch.cat(image)
            hidden = ckpt["model"].model.language_model(inputs_embeds=embeds).last_hidden_state  # positions 0..L-1
            at = inputs.input_ids[0] == proc.tokenizer.convert_tokens_to_ids("<|Reward|>")
            expected.append(ckpt["head"](hidden[0, at])[0, 0])
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-4, rtol=1e-4)


# ---- multi-reward ------------------------------------------------------------------------------------------------


def test_group_normalisation_by_hand():
    """prompts a a b b, scores 1 3 2 2: group a mean 2, population std 1 -> -1, +1; group b has std 0 -> 0, 0."""
    from diffalign.rewards.multi import NORMALIZE

    s, prompts = torch.tensor([1.0, 3.0, 2.0, 2.0]), ["a", "a", "b", "b"]
    torch.testing.assert_close(NORMALIZE["group"](s, prompts), torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    # batch: mean 2, std sqrt(0.5) -> (-1, 1, 0, 0) / 0.7071
    torch.testing.assert_close(
        NORMALIZE["batch"](s, prompts), torch.tensor([-1.4142, 1.4142, 0.0, 0.0]), atol=1e-4, rtol=0
    )


def test_multi_weighted_sum_and_score_cli(tmp_path):
    import json

    import numpy as np
    from diffalign.pipelines.cli import main

    from diffalign.toy import shapes

    arrays, captions = shapes.render_batch(np.random.default_rng(0), 4)
    images = [shapes.to_pil(a) for a in arrays]
    components = {"toy_aesthetic": {"weight": 1.0}, "toy_fidelity": {"weight": 2.0}}
    multi = load_scorer("multi", components=components)
    expected = load_scorer("toy_aesthetic")(images, captions) + 2 * load_scorer("toy_fidelity")(images, captions)
    torch.testing.assert_close(multi(images, captions), expected)
    grouped = load_scorer("multi", components=components, normalize="group")(
        images, [captions[0]] * 2 + [captions[2]] * 2
    )
    assert grouped.shape == (4,) and abs(float(grouped[:2].sum())) < 1e-4  # z-scores of a group sum to 0
    with pytest.raises(ValueError, match="components.toy_fidelity needs a weight"):
        load_scorer("multi", components={"toy_fidelity": {}})
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images):
        im.save(folder / f"{i:05d}.png")
    (tmp_path / "p.txt").write_text("\n".join(captions))
    args = "scorer_args={multi: {components: {toy_aesthetic: {weight: 1.0}, toy_fidelity: {weight: 2.0}}}}"
    out = tmp_path / "score"
    assert main(["score", f"images={folder}", f"prompts_file={tmp_path / 'p.txt'}", "scorers=[multi]", args,
                 f"output_dir={out}"]) == 0  # fmt: skip
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["multi"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-5)
