"""Foreign SAE checkpoint formats: exact numerics against float64 references, round trips, refusals.

Every checkpoint here is written in the format's own on-disk layout (key names, orientation,
dtype, config keys, folder names) with safetensors / numpy / torch.save / json only, and every
reference is written from the format's documented equations (``shared/formats.md``), never
through our SAE.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saesteer.sae.formats import (
    FORMATS,
    detect_format,
    load_any,
    load_dictionary_learning,
    load_gemma_scope,
    load_llama_scope,
    load_sparsify,
    load_steerers,
)
from saesteer.sae.formats.convert import add_convert_args, convert_cli
from saesteer.sae.io import SAEFormatError, load_sae, save_sae

D, F, K, N = 16, 48, 6, 64
TOL = 1e-5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)) * scale


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def topk_dense(values: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest entries (float64), zero elsewhere."""
    out = torch.zeros_like(values)
    idx = values.topk(k, dim=-1).indices
    return out.scatter(-1, idx, values.gather(-1, idx))


def midpoint_threshold(pre: torch.Tensor, q: float) -> float:
    """A threshold halfway between two adjacent positive pre-activations (no value sits on it)."""
    v = pre[pre > 0].sort().values
    i = int(q * (len(v) - 1))
    return float((v[i] + v[i + 1]) / 2)


@dataclass
class Case:
    fmt: str
    path: Path
    x: torch.Tensor  # [N, D] float32 inputs
    ref: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (z, x_hat) float64
    hook: str
    loader: Callable


# -- Llama Scope (lm_saes from_config, formats.md section 2) ------------------------------------


def lm_saes_inference(t: dict, hp: dict, x: torch.Tensor):
    """lm_saes ``from_config`` (dataset-wise fold, then unit decoder norm) + ``encode``/``decode``."""
    s_in = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]
    s_out = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["out"]
    We, be, Wd, bd = (t[n].double() for n in ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"))
    be, bd, Wd = be / s_in, bd / s_out, Wd * s_in / s_out
    if hp["sparsity_include_decoder_norm"]:
        n = Wd.norm(dim=0)
        Wd, We, be = Wd / n, We * n[:, None], be * n
    pre = x.double() @ We.T + be
    act, theta = hp["act_fn"], hp["jump_relu_threshold"]
    if act == "topk" and theta > 0:
        act = "jumprelu"
    if act == "jumprelu":
        z = torch.where(pre > theta, pre, torch.zeros_like(pre))
    elif act == "topk":
        z = topk_dense(pre.clamp(min=0), hp["top_k"])
    else:
        z = pre.clamp(min=0)
    return pre, z, z @ Wd.T + bd


def llama_hp(**kw) -> dict:
    hp = {
        "d_model": D, "d_sae": F, "expansion_factor": F // D,
        "hook_point_in": "blocks.15.hook_resid_post", "hook_point_out": "blocks.15.hook_resid_post",
        "use_decoder_bias": True, "use_glu_encoder": False, "act_fn": "jumprelu", "jump_relu_threshold": 0.0,
        "apply_decoder_bias_to_pre_encoder": False, "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": 10.81, "out": 10.81}, "sparsity_include_decoder_norm": True,
        "top_k": K, "strict_loading": True, "sae_pretrained_name_or_path": None, "dtype": "torch.bfloat16",
        "device": "cuda", "decoder_exactly_fixed_norm": False, "init_decoder_norm": 0.5,
    }
    hp.update(kw)
    return hp


def build_llama_scope(tmp: Path, transcoder=False, act_fn="jumprelu", hp_update=None, drop=(), replace=None, seed=0):
    t = {
        "encoder.weight": randn(F, D, seed=seed, scale=0.4),
        "encoder.bias": randn(F, seed=seed + 1, scale=0.3),
        # decoder columns of uneven norm, so the unit-norm transform matters
        "decoder.weight": randn(D, F, seed=seed + 2) * (0.2 + torch.rand(F, generator=gen(seed + 3))),
        "decoder.bias": randn(D, seed=seed + 4, scale=0.5),
    }
    t = {k: v.to(torch.bfloat16) for k, v in t.items()}  # the release stores bfloat16
    hp = llama_hp(act_fn=act_fn)
    if transcoder:
        hp.update(hook_point_in="blocks.8.ln2.hook_normalized", hook_point_out="blocks.8.hook_mlp_out",
                  dataset_average_activation_norm={"in": 40.0, "out": 3.5})
    x = randn(N, D, seed=seed + 5, scale=hp["dataset_average_activation_norm"]["in"] / math.sqrt(D))
    if act_fn == "jumprelu":  # the threshold lives in lm_saes's inference space: pick one that gates
        pre, _, _ = lm_saes_inference(t, {**hp, "act_fn": "relu"}, x)
        hp["jump_relu_threshold"] = midpoint_threshold(pre, 0.5)
    hp.update(hp_update or {})
    folder = tmp / "Llama3_1-8B-Base-L15R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    on_disk = {k: v.contiguous() for k, v in {**t, **(replace or {})}.items() if k not in drop}
    save_file(on_disk, str(folder / "checkpoints" / "final.safetensors"))
    (folder / "hyperparams.json").write_text(json.dumps(hp, indent=2))

    def ref(x):
        _, z, xh = lm_saes_inference(t, hp, x)
        return z, xh

    return Case("llama_scope", folder, x, ref, hp["hook_point_in"], load_llama_scope)


# -- sparsify (sparse_coder.py, formats.md section 3) ------------------------------------------


def sparsify_cfg(**kw) -> dict:
    cfg = {"activation": "topk", "expansion_factor": F // D, "normalize_decoder": True, "num_latents": 0,
           "k": K, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}
    cfg.update(kw)
    return cfg


def sparsify_tensors(seed: int) -> dict:
    W_dec = randn(F, D, seed=seed + 2)
    return {
        "encoder.weight": randn(F, D, seed=seed, scale=0.4),
        "encoder.bias": randn(F, seed=seed + 1, scale=0.2),
        "W_dec": W_dec / W_dec.norm(dim=1, keepdim=True),
        "b_dec": randn(D, seed=seed + 3, scale=0.5),
    }


def write_sparsify(root: Path, hookpoint: str, t: dict, cfg: dict) -> Path:
    folder = root / hookpoint
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (root / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "dataset": "togethercomputer/RedPajama",
                                                  "ctx_len": 2048, "hookpoints": [hookpoint], "batch_size": 32}))
    return folder


def sparsify_reference(t: dict, transcode: bool, k: int):
    def ref(x):
        xin = x.double() if transcode else x.double() - t["b_dec"].double()
        acts = torch.relu(xin @ t["encoder.weight"].double().T + t["encoder.bias"].double())
        z = topk_dense(acts, k)
        return z, z @ t["W_dec"].double() + t["b_dec"].double()

    return ref


def build_sparsify(tmp: Path, transcode=False, cfg_update=None, drop=(), replace=None, seed=10):
    t = sparsify_tensors(seed)
    on_disk = {k: v for k, v in {**t, **(replace or {})}.items() if k not in drop}
    folder = write_sparsify(tmp / "sae-pythia-70m-32k", "layers.3", on_disk, sparsify_cfg(transcode=transcode, **(cfg_update or {})))
    x = randn(N, D, seed=seed + 4)
    return Case("sparsify", folder, x, sparsify_reference(t, transcode, K), "blocks.3.hook_resid_post", load_sparsify)


# -- Gemma Scope (params.npz, formats.md section 4) --------------------------------------------


def build_gemma_scope(tmp: Path, width="48", drop=(), replace=None, seed=20):
    a = {
        "W_enc": randn(D, F, seed=seed, scale=0.4).numpy(),
        "W_dec": randn(F, D, seed=seed + 1, scale=0.3).numpy(),
        "b_enc": randn(F, seed=seed + 2, scale=0.2).numpy(),
        "b_dec": randn(D, seed=seed + 3, scale=0.5).numpy(),
        "threshold": (torch.rand(F, generator=gen(seed + 4)) * 0.8).numpy(),
    }
    folder = tmp / "gemma-scope-2b-pt-res" / "layer_7" / f"width_{width}" / "average_l0_9"
    folder.mkdir(parents=True)
    on_disk = {k: v for k, v in {**a, **(replace or {})}.items() if k not in drop}
    np.savez(folder / "params.npz", **{k: np.asarray(v, dtype=np.float32) for k, v in on_disk.items()})

    def ref(x):
        W_enc, W_dec, b_enc, b_dec, thr = (torch.from_numpy(a[n]).double() for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"))
        pre = x.double() @ W_enc + b_enc  # b_dec is not subtracted
        z = (pre > thr).double() * torch.relu(pre)
        return z, z @ W_dec + b_dec

    return Case("gemma_scope", folder, randn(N, D, seed=seed + 5), ref, "blocks.7.hook_resid_post", load_gemma_scope)


# -- dictionary_learning (dictionary.py / trainers, formats.md section 5) ----------------------


def build_dictionary_learning(tmp: Path, dict_class="BatchTopKSAE", trainer_update=None, drop=(), replace=None, threshold=None, seed=30):
    enc_w, enc_b = randn(F, D, seed=seed, scale=0.4), randn(F, seed=seed + 1, scale=0.2)
    dec_w = randn(D, F, seed=seed + 2)
    dec_w = dec_w / dec_w.norm(dim=0, keepdim=True)  # unit-norm columns
    bias = randn(D, seed=seed + 3, scale=0.5)
    x = randn(N, D, seed=seed + 4)
    acts = torch.relu((x.double() - bias.double()) @ enc_w.double().T + enc_b.double())
    if dict_class == "AutoEncoder":
        sd = {"bias": bias, "encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w}
    else:
        if threshold is None:
            threshold = midpoint_threshold(acts, 0.6) if dict_class == "BatchTopKSAE" else -1.0
        threshold = float(torch.tensor(threshold, dtype=torch.float32))  # as the float32 buffer holds it
        sd = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(threshold, dtype=torch.float32),
              "decoder.weight": dec_w, "encoder.weight": enc_w, "encoder.bias": enc_b, "b_dec": bias}
    sd = {k: v for k, v in {**sd, **(replace or {})}.items() if k not in drop}
    trainer_class = {"BatchTopKSAE": "BatchTopKTrainer", "AutoEncoderTopK": "TopKTrainer", "AutoEncoder": "StandardTrainer"}[dict_class]
    trainer = {"trainer_class": trainer_class, "dict_class": dict_class, "lr": 3e-4, "steps": 1000, "auxk_alpha": 1 / 32,
               "warmup_steps": 100, "decay_start": None, "threshold_beta": 0.999, "threshold_start_step": 100,
               "top_k_aux": D // 2, "seed": 0, "activation_dim": D, "dict_size": F, "k": K, "device": "cpu",
               "layer": 5, "lm_name": "EleutherAI/pythia-70m-deduped", "wandb_name": "x", "submodule_name": "resid_post_layer_5"}
    trainer.update(trainer_update or {})
    folder = tmp / "save_dir" / "trainer_0"
    folder.mkdir(parents=True)
    torch.save(sd, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"d_submodule": D, "io": "out", "n_ctxs": 100, "ctx_len": 128}}))

    def ref(x):
        a = torch.relu((x.double() - bias.double()) @ enc_w.double().T + enc_b.double())
        if dict_class == "BatchTopKSAE":
            z = a * (a > threshold)
        elif dict_class == "AutoEncoderTopK":
            z = topk_dense(a, K)
        else:
            z = a
        return z, z @ dec_w.double().T + bias.double()

    case = Case("dictionary_learning", folder, x, ref, "blocks.5.hook_resid_post", load_dictionary_learning)
    case.acts, case.threshold = acts, threshold
    return case


# -- Concept Steerers (k_sparse_autoencoder.py, formats.md section 7) --------------------------


def build_steerers(tmp: Path, cfg_update=None, drop=(), replace=None, seed=40):
    dec_w = randn(D, F, seed=seed + 2)
    sd = {
        "pre_bias": randn(D, seed=seed + 3, scale=0.5),
        "latent_bias": randn(F, seed=seed + 1, scale=0.2),
        "stats_last_nonzero": torch.zeros(F, dtype=torch.long),
        "encoder.weight": randn(F, D, seed=seed, scale=0.4),
        "decoder.weight": dec_w / dec_w.norm(dim=0, keepdim=True),
    }
    raw = dict(sd)
    sd = {k: v for k, v in {**sd, **(replace or {})}.items() if k not in drop}
    folder = tmp / "Checkpoints" / "layers.9_k6_hidden48_auxk32_bs4096_lr0.0004_2025-01-01T00:00:00" / "final"
    folder.mkdir(parents=True)
    torch.save({"state_dict": sd}, folder / "state_dict.pth")
    cfg = {"n_dirs_local": F, "d_model": D, "k": K, "auxk": 32, "dead_steps_threshold": 1000, "auxk_coef": 1 / 32}
    cfg.update(cfg_update or {})
    (folder / "config.json").write_text(json.dumps(cfg))

    def ref(x):
        pre = (x.double() - raw["pre_bias"].double()) @ raw["encoder.weight"].double().T + raw["latent_bias"].double()
        vals, idx = pre.topk(K, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        return z, z @ raw["decoder.weight"].double().T + raw["pre_bias"].double()

    return Case("steerers", folder, randn(N, D, seed=seed + 4), ref, "text_encoder.text_model.encoder.layers.9", load_steerers)


BUILDERS = {
    "llama_scope": build_llama_scope,
    "sparsify": build_sparsify,
    "gemma_scope": build_gemma_scope,
    "dictionary_learning": build_dictionary_learning,
    "steerers": build_steerers,
}
CASES = {
    "llama_scope-sae": ("llama_scope", {}),
    "llama_scope-transcoder": ("llama_scope", {"transcoder": True}),
    "llama_scope-topk": ("llama_scope", {"act_fn": "topk"}),
    "sparsify-sae": ("sparsify", {}),
    "sparsify-transcode": ("sparsify", {"transcode": True}),
    "gemma_scope": ("gemma_scope", {}),
    "dictionary_learning-BatchTopKSAE": ("dictionary_learning", {"dict_class": "BatchTopKSAE"}),
    "dictionary_learning-AutoEncoderTopK": ("dictionary_learning", {"dict_class": "AutoEncoderTopK"}),
    "dictionary_learning-AutoEncoder": ("dictionary_learning", {"dict_class": "AutoEncoder"}),
    "steerers": ("steerers", {}),
}


def build(case_id: str, tmp: Path) -> Case:
    fmt, opts = CASES[case_id]
    return BUILDERS[fmt](tmp, **opts)


def assert_matches(sae, case: Case) -> None:
    z_ref, xh_ref = case.ref(case.x)
    with torch.no_grad():
        z = sae.encode(case.x)
        xh = sae.decode(z)
    assert z.dtype == torch.float32
    assert 0 < int((z_ref > 0).sum()) < z_ref.numel()  # some latents fire, not all
    assert torch.equal(z > 0, z_ref > 0)
    assert rel(z, z_ref) < TOL
    assert rel(xh, xh_ref) < TOL


# -- numerics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", list(CASES))
def test_loader_matches_format_reference(case_id, tmp_path):
    case = build(case_id, tmp_path)
    sae = case.loader(case.path, dtype=torch.float32)
    assert sae.cfg.hook_point == case.hook
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D, F)
    assert sae.cfg.input_scale == 1.0 and not sae.W_enc.requires_grad
    assert_matches(sae, case)


def test_llama_scope_details(tmp_path):
    """Default dtype, transcoder metadata, and the two-factor dataset norm."""
    case = build("llama_scope-transcoder", tmp_path)
    assert load_llama_scope(case.path).dtype == torch.bfloat16  # as stored
    sae = load_llama_scope(case.path, dtype=torch.float32)
    assert sae.cfg.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input
    assert sae.cfg.metadata["transcoder"] and sae.cfg.metadata["hook_point_out"] == "blocks.8.hook_mlp_out"
    assert torch.all(sae.threshold == sae.threshold[0])  # one scalar threshold

    hp = json.loads((case.path / "hyperparams.json").read_text())
    from safetensors.torch import load_file

    t = {k: v.double() for k, v in load_file(str(case.path / "checkpoints" / "final.safetensors")).items()}
    s_in = math.sqrt(D) / hp["dataset_average_activation_norm"]["in"]
    s_out = math.sqrt(D) / hp["dataset_average_activation_norm"]["out"]
    theta = hp["jump_relu_threshold"]
    x = case.x.double()
    n = t["decoder.weight"].norm(dim=0)
    # Training-space view: the gate compares n_i * pre_train_i / s_out with theta, and the output
    # is the normalised-space reconstruction divided by s_out.
    pre_train = (x * s_in) @ t["encoder.weight"].T + t["encoder.bias"]
    gated = pre_train * (n * pre_train / s_out > theta)
    xh_train_view = (gated @ t["decoder.weight"].T + t["decoder.bias"]) / s_out
    z_ref, xh_ref = case.ref(case.x)
    assert rel(xh_train_view, xh_ref) < 1e-10
    assert rel(sae.decode(sae.encode(case.x)), xh_train_view) < TOL
    # A single-factor fold (SAELens's norm_scaling_factor = s_in, threshold * s_in, no unit-norm
    # transform) is off by about norm_in / norm_out for a transcoder.
    gated_1f = pre_train * (pre_train > theta * s_in)
    xh_1f = (gated_1f @ t["decoder.weight"].T + t["decoder.bias"]) / s_in
    assert rel(xh_1f, xh_ref) > 1.0


def test_sparsify_saelens_mapping_would_be_wrong(tmp_path):
    """formats.md's warning, checked: W_dec is already [F, D] and b_dec is always subtracted."""
    case = build("sparsify-sae", tmp_path)
    from safetensors.torch import load_file

    t = load_file(str(case.path / "sae.safetensors"))
    assert tuple(t["W_dec"].T.shape) == (D, F) != (F, D)  # SAELens's W_dec.T cannot fit [d_sae, d_in]
    # apply_b_dec_to_input = not normalize_decoder = False would change the code:
    acts = torch.relu(case.x.double() @ t["encoder.weight"].double().T + t["encoder.bias"].double())
    z_ref, _ = case.ref(case.x)
    assert rel(topk_dense(acts, K), z_ref) > 1e-2
    assert load_sparsify(case.path).cfg.apply_b_dec_to_input


def test_sparsify_run_folder_and_hook_names(tmp_path):
    case = build("sparsify-sae", tmp_path)
    root = case.path.parent
    t = sparsify_tensors(99)
    write_sparsify(root, "embed_tokens", t, sparsify_cfg())
    with pytest.raises(SAEFormatError, match="several hook points"):
        load_sparsify(root)
    emb = load_sparsify(root, hookpoint="embed_tokens")
    assert emb.cfg.hook_point == "hook_embed" and emb.cfg.model_name == "EleutherAI/pythia-70m"
    assert detect_format(root) == "sparsify"
    sae = load_any(root, hook_point="layers.3")
    assert sae.cfg.hook_point == "blocks.3.hook_resid_post"
    assert_matches(sae, case)
    assert load_any(case.path, hook_point="blocks.4.hook_resid_post").cfg.hook_point == "blocks.4.hook_resid_post"


def test_gemma_scope_path_and_file(tmp_path):
    case = build("gemma_scope", tmp_path)
    sae = load_gemma_scope(case.path / "params.npz")
    assert sae.cfg.model_name == "google/gemma-2-2b" and sae.cfg.metadata["average_l0"] == 9
    assert sae.cfg.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input
    assert_matches(sae, case)
    assert load_gemma_scope(case.path, hook_point="blocks.7.hook_mlp_out").cfg.hook_point == "blocks.7.hook_mlp_out"
    assert detect_format(case.path / "params.npz") == "gemma_scope"


def test_dictionary_learning_batchtopk_uses_its_threshold(tmp_path):
    case = build("dictionary_learning-BatchTopKSAE", tmp_path)
    a, thr = case.acts, case.threshold
    assert bool(((a > 0) & (a <= thr)).any())  # a plain-ReLU reading (SAELens) would keep these
    sae = load_dictionary_learning(case.path)
    assert sae.cfg.architecture == "batchtopk" and sae.cfg.k == K
    assert torch.allclose(sae.threshold, torch.full((F,), thr))
    assert sae.cfg.model_name == "EleutherAI/pythia-70m-deduped"


# -- round trip, detection, dispatch, CLI -------------------------------------------------------


@pytest.mark.parametrize("case_id", list(CASES))
def test_round_trip_through_our_format(case_id, tmp_path):
    case = build(case_id, tmp_path / "src")
    sae = case.loader(case.path, dtype=torch.float32)
    back = load_sae(save_sae(sae, tmp_path / "ours"))
    assert (back.cfg.architecture, back.cfg.k, back.cfg.hook_point) == (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_point)
    assert back.cfg.apply_b_dec_to_input == sae.cfg.apply_b_dec_to_input
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        if name == "threshold" and sae.cfg.architecture not in ("jumprelu", "batchtopk"):
            continue
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    assert_matches(back, case)


@pytest.mark.parametrize("fmt", list(BUILDERS))
def test_detect_format_and_load_any(fmt, tmp_path):
    case = BUILDERS[fmt](tmp_path)
    assert detect_format(case.path) == fmt
    sae = load_any(case.path, dtype=torch.float32)
    assert sae.cfg.hook_point == case.hook
    assert_matches(sae, case)
    assert_matches(load_any(case.path, format=fmt, dtype="float32"), case)
    assert load_any(case.path, hook_point="blocks.1.hook_resid_post").cfg.hook_point == "blocks.1.hook_resid_post"


def test_detect_and_load_any_on_our_format(tmp_path):
    case = build("gemma_scope", tmp_path / "src")
    out = save_sae(load_gemma_scope(case.path), tmp_path / "ours")
    assert detect_format(out) == "saelens"
    assert_matches(load_any(out), case)
    assert set(FORMATS) == {"saelens", *BUILDERS}


def test_convert_cli(tmp_path, capsys):
    case = build("llama_scope-transcoder", tmp_path / "src")
    parser = add_convert_args(argparse.ArgumentParser(prog="saesteer convert"))
    args = parser.parse_args([str(case.path), "--out", str(tmp_path / "f32"), "--dtype", "float32"])
    assert args.format == "auto" and args.hook_point is None
    assert convert_cli(args) == 0
    assert "jumprelu" in capsys.readouterr().out
    back = load_sae(tmp_path / "f32")
    assert back.cfg.hook_point == "blocks.8.ln2.hook_normalized" and back.dtype == torch.float32
    assert_matches(back, case)
    # half precision on disk: one rounding of the float64-folded weights
    args = parser.parse_args([str(case.path), "--format", "llama_scope", "--out", str(tmp_path / "f16"),
                              "--dtype", "float16", "--hook", "blocks.8.hook_mlp_in"])
    assert convert_cli(args) == 0
    half = load_sae(tmp_path / "f16")
    assert half.dtype == torch.float16 and half.cfg.hook_point == "blocks.8.hook_mlp_in"
    half = load_sae(tmp_path / "f16", dtype=torch.float32)
    assert torch.allclose(half.W_dec, back.W_dec, rtol=1e-3, atol=1e-4)
    # refused source: exit status 2, reason on stderr
    bad = parser.parse_args([str(tmp_path / "f32"), "--format", "gemma_scope", "--out", str(tmp_path / "x")])
    assert convert_cli(bad) == 2
    assert "params.npz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args([str(case.path), "--out", "o", "--format", "nope"])


# -- refusals ----------------------------------------------------------------------------------

REFUSALS = [
    # Llama Scope
    ("llama_scope", {"drop": ("decoder.bias",)}, r"missing tensors \['decoder.bias'\]"),
    ("llama_scope", {"hp_update": {"d_model": D + 1, "d_sae": F, "expansion_factor": None}}, r"encoder.weight has shape \(48, 16\)"),
    ("llama_scope", {"hp_update": {"d_sae": F + 1}}, r"d_sae=49 disagrees"),
    ("llama_scope", {"hp_update": {"act_fn": "batchtopk"}}, r"unknown activation act_fn='batchtopk'"),
    ("llama_scope", {"hp_update": {"norm_activation": "token-wise"}}, r"norm_activation='token-wise'"),
    ("llama_scope", {"hp_update": {"jump_relu_threshold": -0.1}}, r"jump_relu_threshold=-0.1"),
    ("llama_scope", {"hp_update": {"dataset_average_activation_norm": None}}, r"no dataset_average_activation_norm"),
    ("llama_scope", {"hp_update": {"use_glu_encoder": True}}, r"use_glu_encoder"),
    ("llama_scope", {"replace": {"log_jumprelu_threshold": torch.zeros(F)}}, r"log_jumprelu_threshold"),
    # sparsify
    ("sparsify", {"drop": ("b_dec",)}, r"missing tensors \['b_dec'\]"),
    ("sparsify", {"cfg_update": {"d_in": D + 1}}, r"encoder.weight has shape \(48, 16\), the config implies \(51, 17\)"),
    ("sparsify", {"cfg_update": {"num_latents": F + 2}}, r"encoder.weight has shape"),
    ("sparsify", {"cfg_update": {"skip_connection": True}, "replace": {"W_skip": torch.zeros(D, D)}}, r"skip_connection"),
    ("sparsify", {"cfg_update": {"activation": "groupmax"}}, r"groupmax"),
    ("sparsify", {"cfg_update": {"activation": "batchtopk"}}, r"unknown activation 'batchtopk'"),
    ("sparsify", {"cfg_update": {"k": F + 1}}, r"k=49"),
    # Gemma Scope
    ("gemma_scope", {"drop": ("threshold",)}, r"missing tensors \['threshold'\]"),
    ("gemma_scope", {"replace": {"W_dec": np.zeros((F, D + 1))}}, r"W_dec has shape \(48, 17\)"),
    ("gemma_scope", {"width": "16k"}, r"width_16k disagrees"),
    # dictionary_learning
    ("dictionary_learning", {"threshold": -1.0}, r"threshold=-1.0 was never set"),
    ("dictionary_learning", {"drop": ("threshold",)}, r"missing tensors \['threshold'\]"),
    ("dictionary_learning", {"drop": ("b_dec",)}, r"missing tensors \['b_dec'\]"),
    ("dictionary_learning", {"trainer_update": {"dict_size": F + 1}}, r"encoder.weight has shape \(48, 16\)"),
    ("dictionary_learning", {"trainer_update": {"k": K + 1}}, r"config k=7 disagrees"),
    ("dictionary_learning", {"trainer_update": {"dict_class": "GatedAutoEncoder"}}, r"dict_class='GatedAutoEncoder' is not supported"),
    ("dictionary_learning", {"dict_class": "AutoEncoderTopK", "replace": {"decoder.bias": torch.zeros(D)}}, r"unexpected tensors \['decoder.bias'\]"),
    # Concept Steerers
    ("steerers", {"drop": ("latent_bias",)}, r"missing tensors \['latent_bias'\]"),
    ("steerers", {"cfg_update": {"d_model": D + 1}}, r"encoder.weight has shape \(48, 16\)"),
    ("steerers", {"replace": {"encoder.bias": torch.zeros(F)}}, r"unexpected tensors \['encoder.bias'\]"),
    ("steerers", {"cfg_update": {"k": 0}}, r"k=0"),
    ("steerers", {"cfg_update": {"n_dirs_local": None}}, r"lacks \['n_dirs_local'\]"),
]


@pytest.mark.parametrize("fmt,opts,match", REFUSALS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(REFUSALS)])
def test_refuses_inconsistent_checkpoints(fmt, opts, match, tmp_path):
    case = BUILDERS[fmt](tmp_path, **opts)
    with pytest.raises(SAEFormatError, match=match):
        case.loader(case.path)
    with pytest.raises(SAEFormatError, match=match):  # load_any refuses the same way
        load_any(case.path, format=fmt)


def test_refuses_unknown_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEFormatError, match="unknown SAE checkpoint layout"):
        detect_format(tmp_path / "empty")
    with pytest.raises(SAEFormatError, match="no such file"):
        detect_format(tmp_path / "missing")
    with pytest.raises(SAEFormatError, match="unknown SAE format 'foo'"):
        load_any(tmp_path / "empty", format="foo")
    with pytest.raises(SAEFormatError, match="missing checkpoints|no weights file"):
        (tmp_path / "ls").mkdir()
        (tmp_path / "ls" / "hyperparams.json").write_text(json.dumps(llama_hp()))
        load_any(tmp_path / "ls")
