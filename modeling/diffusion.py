"""Text-to-image pipelines whose text encoder SAEs attach to: loading them, their hook points, the
CLIP tokenizer we ship, and the small pixel-space pipeline the project trains (``ShapesPipeline``).

Hook points on a CLIP text encoder use the LLM names (``saesteer.modeling.lm``): ``blocks.L.hook_resid_post``
is the output of ``encoder.layers[L]`` (``text_model.encoder.layers[L]`` before transformers 5.24),
so the ``Steerer`` and the SAE math run unchanged. Concept Steerers (Kim & Ghadiyaram, 2025) hook
SD 1.4's ``text_encoder.text_model.encoder.layers.9``, i.e. ``blocks.9.hook_resid_post``; their
spelling is accepted (``normalize_hook_point``).

The CLIP tokenizer of SD 1.x is built offline from the BPE merges that ``open-clip-torch`` ships
(``bpe_simple_vocab_16e6.txt.gz``, MIT), following CLIP's ``simple_tokenizer``: 256 byte symbols,
the same with ``</w>``, one symbol per merge (48,894), then ``<|startoftext|>`` (49406) and
``<|endoftext|>`` (49407); 49,408 tokens.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path

import torch

DIFFUSION_HOOK_ALIASES = re.compile(r"^text_encoder\.(?:text_model\.)?encoder\.layers\.(\d+)$")
CLIP_VOCAB_SIZE = 49408


def normalize_hook_point(name: str) -> str:
    """``text_encoder.[text_model.]encoder.layers.L`` (Concept Steerers' spelling) ->
    ``blocks.L.hook_resid_post``; other names unchanged."""
    m = DIFFUSION_HOOK_ALIASES.match(name)
    return f"blocks.{m.group(1)}.hook_resid_post" if m else name


# -- the CLIP tokenizer, offline -----------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map of the 256 byte values onto printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def write_clip_tokenizer_files(folder: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of SD 1.x's CLIP tokenizer into ``folder`` (for
    ``transformers.CLIPTokenizer``), from the BPE file ``open-clip-torch`` ships.

    Raises:
        FileNotFoundError: no ``bpe_path`` and ``open-clip-torch`` is not installed
            (``pip install --no-deps open-clip-torch``).
    """
    if bpe_path is None:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the CLIP vocabulary needs open-clip-torch: pip install --no-deps open-clip-torch")
        bpe_path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out


def clip_tokenizer(folder: str | Path | None = None, max_length: int = 77):
    """SD 1.x's ``CLIPTokenizer`` (from ``folder``, or built into a cache folder from the shipped
    BPE file); ``model_max_length`` ``max_length``, padding with ``<|endoftext|>`` as SD does."""
    from transformers import CLIPTokenizer

    if folder is None or not (Path(folder) / "vocab.json").is_file():
        from .cache import cache_dir

        cache = cache_dir("clip-tokenizer")
        folder = folder or cache
        if not (Path(folder) / "vocab.json").is_file():
            write_clip_tokenizer_files(folder)
    return CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"),
                         model_max_length=max_length, pad_token="<|endoftext|>")


# -- the small pixel-space pipeline ----------------------------------------------------------------


def _pipeline_base():
    from diffusers import DiffusionPipeline

    return DiffusionPipeline


class ShapesPipeline(_pipeline_base()):
    """A pixel-space text-to-image pipeline (no VAE): CLIP text encoder -> UNet2DConditionModel on
    RGB images in [-1, 1], DDIM sampling with classifier-free guidance. Called like
    ``StableDiffusionPipeline``, with ``prompt``/``negative_prompt`` or precomputed
    ``prompt_embeds``/``negative_prompt_embeds`` [batch, tokens, d_text] (what steering passes).
    """

    def __init__(self, unet, text_encoder, tokenizer, scheduler, default_steps: int = 20, default_guidance_scale: float = 1.5):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(default_steps=default_steps, default_guidance_scale=default_guidance_scale)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [len(prompts), model_max_length, d_text] (the encoder's last hidden state)."""
        return self.text_encoder(prompt_token_ids(self.tokenizer, prompts).to(self.device))[0]

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, generator=None, num_images_per_prompt: int = 1,
                 prompt_embeds=None, negative_prompt_embeds=None, output_type: str = "pil", callback_on_step_end=None):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        num_inference_steps, guidance_scale = pipeline_defaults(self, num_inference_steps, guidance_scale)
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self.encode(prompts)
        if negative_prompt_embeds is None:
            neg = negative_prompt or ""
            neg = [neg] * prompt_embeds.shape[0] if isinstance(neg, str) else list(neg)
            negative_prompt_embeds = self.encode(neg)
        cond = prompt_embeds.repeat_interleave(num_images_per_prompt, 0)
        uncond = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, 0)
        size = self.unet.config.sample_size
        h, w = height or size, width or size
        x = torch.randn((cond.shape[0], self.unet.config.in_channels, h, w), generator=generator,
                        device="cpu", dtype=self.unet.dtype).to(self.device)
        self.scheduler.set_timesteps(num_inference_steps)
        x = x * self.scheduler.init_noise_sigma
        for i, t in enumerate(self.scheduler.timesteps):
            inp = self.scheduler.scale_model_input(torch.cat([x, x]), t)
            eps = self.unet(inp, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            e_u, e_c = eps.chunk(2)
            x = self.scheduler.step(e_u + guidance_scale * (e_c - e_u), t, x).prev_sample
            if callback_on_step_end is not None:  # diffusers' contract: (pipe, step, timestep, kwargs) -> kwargs
                callback_on_step_end(self, i, t, {})
        img = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=img)
        from PIL import Image

        # not self.numpy_to_pil: it multiplies by 255 itself, and a uint8 array times 255 wraps
        # around to the negative image
        arr = (img.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
        return ImagePipelineOutput(images=[Image.fromarray(a) for a in arr])


def native_size(pipe) -> int:
    """The side in pixels a pipeline draws by default: the UNet's ``sample_size`` times the VAE's
    downsampling factor (``vae_scale_factor``, 8 for SD; 1 for a pixel-space ``ShapesPipeline``)."""
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 1))


def pipeline_defaults(pipe, steps: int | None = None, guidance_scale: float | None = None) -> tuple[int, float]:
    """``(steps, guidance_scale)``: the ones given, else the pipeline's (``default_steps`` and
    ``default_guidance_scale`` in a ``ShapesPipeline``'s ``model_index.json``), else Stable
    Diffusion's usual 25 steps and guidance 7.5."""
    cfg = getattr(pipe, "config", {})
    return (steps if steps is not None else int(cfg.get("default_steps", 25)),
            guidance_scale if guidance_scale is not None else float(cfg.get("default_guidance_scale", 7.5)))


def load_pipeline(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a local folder or hub id: our ``ShapesPipeline`` when its
    ``model_index.json`` names it, else ``StableDiffusionPipeline`` (SD 1.x/2.x). The safety checker
    is not loaded (steering is the safety mechanism here); progress bars are off.

    Raises:
        FileNotFoundError, OSError: no such folder and no reachable hub repo.
    """
    from diffusers import DiffusionPipeline

    index = Path(model) / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") == "ShapesPipeline":
        pipe = ShapesPipeline.from_pretrained(model, dtype=dtype)
    else:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.text_encoder.eval().requires_grad_(False)
    return pipe


def prompt_token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids [len(prompts), model_max_length] int64, padded and truncated exactly as the
    pipelines pad them before the text encoder (``StableDiffusionPipeline.encode_prompt``)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
