"""The text-to-image groundwork (issue 16): SD 1.x's CLIP tokenizer built offline, the small
pixel-space pipeline (built, saved, loaded, sampled), steering hooks on a CLIP text encoder, and the
synthetic shapes with their pixel reader. Tiny random weights: these test plumbing, not quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from saesteer.modeling.diffusion import ShapesPipeline, clip_tokenizer, load_pipeline, normalize_hook_point
from saesteer.modeling.lm import resolve_hook_point
from saesteer.sae.model import SAE, SAEConfig
from saesteer.steering.eval.shapes import COLOURS, SHAPES, read_image, render, sample
from saesteer.steering.core import StepPositions
from saesteer.steering.hooks import Steerer
from saesteer.steering.plan import InterventionPlan, LatentEdit


def test_clip_tokenizer_matches_sd1():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_concept_steerers_hook_spelling_maps_onto_ours():
    assert normalize_hook_point("text_encoder.text_model.encoder.layers.9") == "blocks.9.hook_resid_post"
    assert normalize_hook_point("text_encoder.encoder.layers.3") == "blocks.3.hook_resid_post"
    assert normalize_hook_point("blocks.2.hook_resid_post") == "blocks.2.hook_resid_post"


def test_the_pixel_reader_reads_rendered_shapes():
    rng = np.random.default_rng(0)
    specs = [sample(rng) for _ in range(120)]
    reads = [read_image(render(s)) for s in specs]
    assert sum(r["colour"] == s.colour for r, s in zip(reads, specs)) == len(specs)
    assert sum(r["shape"] == s.shape for r, s in zip(reads, specs)) >= 0.95 * len(specs)
    assert {s.colour for s in specs} == set(COLOURS) and {s.shape for s in specs} == set(SHAPES)
    wide = [s for s in specs if s.background == "black"][:20]  # a 32x48 image (the API takes any multiple of 8)
    padded = [np.concatenate([np.full((32, 8, 3), 15, np.uint8), render(s), np.full((32, 8, 3), 15, np.uint8)], 1) for s in wide]
    assert [read_image(im)["shape"] for im in padded] == [read_image(render(s))["shape"] for s in wide]


def tiny_pipeline_folder(folder):
    """A ShapesPipeline with tiny random weights (16x16 images, a 10-layer 32-wide text encoder)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = clip_tokenizer(max_length=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=10,
                                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    pipe = ShapesPipeline(unet=unet, text_encoder=text, tokenizer=tok, scheduler=DDIMScheduler(beta_schedule="squaredcos_cap_v2"))
    pipe.save_pretrained(folder)
    return folder


def tiny_sae(hook_point="blocks.9.hook_resid_post", d_in=32, d_sae=64, seed=0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig("topk", d_in, d_sae, k=4, hook_point=hook_point))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    return load_pipeline(str(tiny_pipeline_folder(tmp_path_factory.mktemp("pipe"))))


def test_the_pipeline_round_trips_and_samples_the_requested_size(tiny_pipe):
    assert type(tiny_pipe).__name__ == "ShapesPipeline"
    a = tiny_pipe(prompt=["a red circle on a white background"], num_inference_steps=3, generator=torch.Generator().manual_seed(1)).images
    b = tiny_pipe(prompt=["a red circle on a white background"], num_inference_steps=3, generator=torch.Generator().manual_seed(1)).images
    assert a[0].size == (16, 16) and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_steering_hooks_run_on_the_text_encoder(tiny_pipe):
    """Layer 9 of the CLIP text encoder is ``blocks.9.hook_resid_post``: an idle hook leaves the text
    embeddings bit-identical (the error term), a clamp changes them from position 1 on."""
    enc = tiny_pipe.text_encoder
    assert resolve_hook_point(enc, "blocks.9.hook_resid_post").module is enc.encoder.layers[9]
    sae = tiny_sae()
    ids = tiny_pipe.tokenizer(["a blue star on a black background"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    plain = enc(ids)[0]
    steerer = Steerer(enc, {"s": sae})
    pos = StepPositions(abs_pos=torch.arange(16).unsqueeze(0), prompt_len=torch.tensor([16]))
    idle = InterventionPlan(latent_edits=[LatentEdit("s", 5, "scale", 1.0, "all")])
    with torch.no_grad(), steerer.steer([idle], pos):
        same = enc(ids)[0]
    assert torch.equal(same, plain)
    clamp = InterventionPlan(latent_edits=[LatentEdit("s", 5, "clamp", 20.0, "all")])
    with torch.no_grad(), steerer.steer([clamp], pos):
        steered = enc(ids)[0]
    assert torch.equal(steered[:, 0], plain[:, 0]) and not torch.allclose(steered[:, 1:], plain[:, 1:])


def test_pil_output_is_the_tensor_output_not_its_negative(tiny_pipe):
    """diffusers' numpy_to_pil multiplies by 255 itself; fed uint8 it wrapped around to the negative
    image (every colour inverted), which is what the pipeline once returned."""
    kw = dict(prompt=["a red circle on a white background"], num_inference_steps=3, generator=None)
    pil = tiny_pipe(**{**kw, "generator": torch.Generator().manual_seed(2)}).images[0]
    pt = tiny_pipe(**{**kw, "generator": torch.Generator().manual_seed(2)}, output_type="pt").images[0]
    expect = (pt.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(pil), expect)
