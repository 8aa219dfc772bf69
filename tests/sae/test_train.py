"""The trainer: its sparse fast path against the dense eager twin, exact batch L0, and learning."""

from __future__ import annotations

import json

import pytest
import torch

from saesteer.sae.model import SAE, SAEConfig
from saesteer.sae.train import TrainConfig, _sparse_forward, dense_forward, select_topk, train_sae


@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_sparse_training_forward_equals_dense(arch):
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(arch, 16, 64, k=4)).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    xs = torch.randn(32, 16, generator=g, dtype=torch.float64)
    cfg = TrainConfig(architecture=arch, d_sae=64, k=4)
    _, _, xh = _sparse_forward(sae, xs, cfg)
    g_fast = torch.autograd.grad(xh.pow(2).sum(), list(sae.parameters()))
    xh_ref = dense_forward(sae, xs, 4, arch)
    g_ref = torch.autograd.grad(xh_ref.pow(2).sum(), list(sae.parameters()))
    assert ((xh - xh_ref).norm() / xh_ref.norm()) < 1e-12
    for a, b in zip(g_fast, g_ref):
        assert ((a - b).norm() / b.norm()) < 1e-10


def test_batchtopk_batch_l0_is_exactly_k():
    pre = torch.randn(256, 512)
    rows, cols = select_topk(pre, 8, "batchtopk")
    assert rows.numel() == 8 * 256  # k per token on average over the batch, exactly
    per_row = torch.bincount(rows, minlength=256)
    assert per_row.min() < 8 < per_row.max()  # ...while tokens use a variable number
    rows_t, _ = select_topk(pre, 8, "topk")
    assert torch.equal(torch.bincount(rows_t, minlength=256), torch.full((256,), 8))


def _synthetic(n=40_000, d=32, n_feat=128, active=4, seed=0):
    """Sparse mixture of unit directions: the kind of data an SAE should recover."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_feat, d, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    idx = torch.stack([torch.randperm(n_feat, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 3 + 0.5
    return (coef.unsqueeze(-1) * D[idx]).sum(1) + 0.01 * torch.randn(n, d, generator=g)


def test_training_lowers_nmse_and_threshold_matches_k_on_heldout():
    from saesteer.sae.evaluate import reconstruction_metrics

    data = _synthetic()
    train, held = data[:36_000], data[36_000:]
    cfg = TrainConfig(d_sae=256, k=4, batch_size=512, n_tokens=512 * 300, lr=3e-3, dead_tokens=20_000, seed=0)
    res = train_sae(train, cfg, progress=False)
    assert res.log[-1]["nmse"] < 0.5 * res.log[0]["nmse"]
    figs = reconstruction_metrics(res.sae, held)
    assert figs["nmse"] < 0.2
    assert abs(figs["l0"] - cfg.k) / cfg.k < 0.1  # inference threshold reproduces the batch L0


def test_jumprelu_straight_through_gradients_match_the_paper():
    """Rajamanoharan et al. 2024, Eqs. 11-12, in float64: d/dtheta of pre*H(pre-theta) and of H."""
    from saesteer.sae.train import _JumpReLU, _Step

    pre = torch.tensor([[0.10, 0.52, 0.49, 2.0], [0.505, -1.0, 0.3, 0.55]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    eps = 0.1
    z = _JumpReLU.apply(pre, theta, eps)
    assert torch.equal(z.detach(), torch.where(pre > theta, pre, torch.zeros_like(pre)).detach())
    g_pre, g_theta = torch.autograd.grad(z.sum(), [pre, theta])
    in_window = ((pre - theta).abs() < eps / 2).double()
    assert torch.allclose(g_theta, (-(theta / eps) * in_window).sum(0))
    assert torch.allclose(g_pre, (pre > theta).double())
    (g_theta_step,) = torch.autograd.grad(_Step.apply(pre, theta, eps).sum(), [theta])
    assert torch.allclose(g_theta_step, (-(1 / eps) * in_window).sum(0))


@pytest.mark.parametrize("arch,coef", [("jumprelu", {"l0_coef": 0.05}), ("relu", {"l1_coef": 0.3})])
def test_jumprelu_and_relu_training_learn_sparse_codes(arch, coef):
    from saesteer.sae.evaluate import reconstruction_metrics

    data = _synthetic()
    cfg = TrainConfig(architecture=arch, d_sae=256, batch_size=512, n_tokens=512 * 300, lr=3e-3, dead_tokens=20_000,
                      seed=0, jumprelu_init_threshold=0.05, **coef)
    res = train_sae(data[:36_000], cfg, progress=False)
    figs = reconstruction_metrics(res.sae, data[36_000:])
    assert figs["nmse"] < 0.3, figs
    assert figs["l0"] < 0.4 * cfg.d_sae, figs  # sparse (half the latents are on at init)
    stronger = train_sae(data[:36_000], TrainConfig(**{**cfg.__dict__, **{k: 10 * v for k, v in coef.items()}}), progress=False)
    assert reconstruction_metrics(stronger.sae, data[36_000:])["l0"] < figs["l0"]  # the penalty controls L0


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(arch, tmp_path):
    torch.set_num_threads(1)
    data = _synthetic(n=8_000)
    cfg = TrainConfig(architecture=arch, d_sae=64, k=4, batch_size=512, n_tokens=512 * 30, lr=2e-3, dead_tokens=2_000,
                      seed=3, l0_coef=0.05, jumprelu_init_threshold=0.05)
    full = train_sae(data, cfg, progress=False).sae
    train_sae(data, cfg, progress=False, checkpoint_dir=str(tmp_path), stop_after=13)
    resumed = train_sae(data, cfg, progress=False, checkpoint_dir=str(tmp_path), resume=True).sae
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(full, name), getattr(resumed, name)), name


def test_aux_k_revives_dead_latents():
    """Half the latents start dead by construction (a bias that loses every top-k race); without
    the auxiliary loss they never get a gradient and stay dead, with it they come back."""
    from saesteer.sae.train import dataset_input_scale

    data = _synthetic(n=20_000, d=32, n_feat=128, seed=2)
    d_sae = 128
    init = SAE(SAEConfig("batchtopk", 32, d_sae, k=4, input_scale=dataset_input_scale(data)))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        w = torch.randn(d_sae, 32, generator=g)
        init.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        init.W_enc.copy_(init.W_dec.T)
        init.b_enc[d_sae // 2:] = -4.0
    base = dict(d_sae=d_sae, k=4, batch_size=512, n_tokens=512 * 300, lr=3e-3, dead_tokens=3_000, seed=0)
    without = train_sae(data, TrainConfig(**base, aux_coef=0.0), progress=False, init=init).log[-1]["dead_frac"]
    with_aux = train_sae(data, TrainConfig(**base, aux_coef=1 / 32), progress=False, init=init).log[-1]["dead_frac"]
    assert without > 0.4, without
    assert with_aux < 0.6 * without, (with_aux, without)  # measured: 0.49 -> 0.27 in 300 steps


def test_geometric_median_resists_outliers():
    from saesteer.sae.train import geometric_median

    x = torch.zeros(101, 3)
    x[:50, 0], x[50:100, 0], x[100] = 1.0, -1.0, torch.tensor([0, 1e4, 0])
    m = geometric_median(x)  # the optimum sits ~0.01 off the axis; the mean is ~99 away
    assert m.norm() < 0.05 and float(x.mean(0).norm()) > 50


def test_bfloat16_mixed_precision_training_learns():
    data = _synthetic(n=20_000)
    cfg = TrainConfig(d_sae=256, k=4, batch_size=512, n_tokens=512 * 100, lr=3e-3, dead_tokens=20_000, dtype="bfloat16")
    res = train_sae(data, cfg, progress=False)
    assert res.sae.W_enc.dtype == torch.float32  # weights stay fp32
    assert res.log[-1]["nmse"] < 0.5 * res.log[0]["nmse"]


def test_eval_markdown_table_lists_the_figures():
    from saesteer.sae.evaluate import markdown_table

    md = markdown_table({"l0": 31.5, "nmse": 0.125, "ce_loss_recovered": 0.99, "tokens": 100}, title="x")
    assert "| L0 | 31.5000 |" in md and "| normalized MSE | 0.1250 |" in md and "| tokens (reconstruction) | 100 |" in md


# -- config files (YAML/JSON) and the resolved train_config.yaml ---------------------------------


def test_config_file_round_trip_gives_the_same_configs(tmp_path):
    from saesteer.sae.train_config import RunConfig, load_config, write_config

    cfg = TrainConfig(architecture="topk", d_sae=123, k=7, lr=3.5e-4, adam_betas=(0.8, 0.99), aux_coef=1 / 32, seed=9)
    run = RunConfig(hook_point="blocks.3.hook_resid_post", acts="a.safetensors", ce_tokens=0, out_dtype="bfloat16")
    path = write_config(tmp_path / "run.yaml", cfg, run)
    cfg2, run2 = load_config(path)
    assert cfg2 == cfg and isinstance(cfg2.adam_betas, tuple)
    assert run2 == run  # out/checkpoint fields are not written, and equal their defaults here
    import yaml

    doc = yaml.safe_load(path.read_text())
    assert "out" not in doc and "resume" not in doc and doc["seed"] == 9 and doc["warmup_frac"] == 0.02  # defaults too
    (tmp_path / "run.json").write_text(json.dumps(doc))
    assert load_config(tmp_path / "run.json") == (cfg, run)


def test_config_unknown_key_and_bad_values_are_named(tmp_path):
    from saesteer.sae.train_config import ConfigError, load_config, resolve_config

    p = tmp_path / "run.yaml"
    p.write_text("d_sae: 64\nlearning_rate: 0.001\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        load_config(p)
    with pytest.raises(ConfigError, match="d_sae must be an integer"):
        resolve_config({"d_sae": "wide"})
    p.write_text("lr: 5e-4\nn_tokens: 1e6\n")  # YAML 1.1 reads 5e-4 as a string: coerced
    cfg, _ = load_config(p)
    assert cfg.lr == 5e-4 and cfg.n_tokens == 1_000_000
    (tmp_path / "run.toml").write_text("")
    with pytest.raises(ConfigError, match="yaml, .yml or .json"):
        load_config(tmp_path / "run.toml")


def test_cli_flags_override_the_config_file(tmp_path):
    from saesteer.cli import build_parser
    from saesteer.sae.train_config import cli_overrides, load_config

    p = tmp_path / "run.yaml"
    p.write_text("d_sae: 64\nk: 4\nlr: 0.001\nbatch_size: 256\nhook: blocks.1.hook_resid_post\nout_dtype: float32\nout: a\n")
    a = build_parser().parse_args(["train", "--config", str(p), "--k", "8", "--set", "batch_size=512", "--set",
                                   "aux_coef=0", "--dtype", "bfloat16", "--train-dtype", "bfloat16", "--out", "b"])
    cfg, run = load_config(p, cli_overrides(a))
    assert (cfg.d_sae, cfg.k, cfg.lr, cfg.batch_size, cfg.aux_coef, cfg.dtype) == (64, 8, 0.001, 512, 0.0, "bfloat16")
    assert (run.hook_point, run.out_dtype, run.out, run.resume) == ("blocks.1.hook_resid_post", "bfloat16", "b", False)
    a = build_parser().parse_args(["train", "--config", str(p), "--set", "k=16", "--k", "2"])
    assert load_config(p, cli_overrides(a))[0].k == 2  # named flags win over --set


def test_train_from_config_file_writes_a_config_that_redoes_the_run(tmp_path):
    from safetensors.torch import load_file

    from saesteer.cli import main
    from saesteer.sae.activations import save_activations

    torch.set_num_threads(1)
    data = _synthetic(n=6_000)
    save_activations(data[:5_000].half(), tmp_path / "train.safetensors")
    save_activations(data[5_000:].half(), tmp_path / "val.safetensors")
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        f"acts: {tmp_path / 'train.safetensors'}\nval_acts: {tmp_path / 'val.safetensors'}\n"
        "ce_tokens: 0\nhook: blocks.0.hook_resid_post\nd_sae: 64\nk: 4\nbatch_size: 256\nn_tokens: 5120\n"
        "lr: 3e-3\ndead_tokens: 2000\nseed: 7\n"
    )
    out1, out2 = tmp_path / "one", tmp_path / "two"
    assert main(["train", "--config", str(cfg_file), "--out", str(out1)]) == 0
    assert (out1 / "train_config.yaml").is_file() and (out1 / "figures.json").is_file()
    assert main(["train", "--config", str(out1 / "train_config.yaml"), "--out", str(out2)]) == 0
    assert (out1 / "train_config.yaml").read_text() == (out2 / "train_config.yaml").read_text()
    w1, w2 = load_file(str(out1 / "sae_weights.safetensors")), load_file(str(out2 / "sae_weights.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[n], w2[n]) for n in w1)
    figs = json.loads((out1 / "figures.json").read_text())
    assert figs["nmse"] < 1.0 and "ce_loss_recovered" not in figs


def test_train_cli_init_continues_a_saved_sae(tmp_path):
    """--init starts from a saved SAE: its parameters and input scale, so a short continuation ends
    below the NMSE a fresh run of the same length reaches, and the card records what came before."""
    from saesteer.cli import main
    from saesteer.sae.activations import save_activations
    from saesteer.sae.io import load_sae

    torch.set_num_threads(1)
    data = _synthetic(n=6_000) * 25  # norms like a residual stream's: input scale ~0.05, far from 1
    save_activations(data[:5_000].half(), tmp_path / "train.safetensors")
    save_activations(data[5_000:].half(), tmp_path / "val.safetensors")
    common = ["--acts", str(tmp_path / "train.safetensors"), "--val-acts", str(tmp_path / "val.safetensors"),
              "--ce-tokens", "0", "--hook", "blocks.0.hook_resid_post", "--d-sae", "64", "--k", "4",
              "--batch-size", "256", "--lr", "3e-3", "--set", "dead_tokens=2000", "--dtype", "float32"]
    first, fresh, cont = tmp_path / "first", tmp_path / "fresh", tmp_path / "cont"
    assert main(["train", *common, "--n-tokens", "10240", "--out", str(first)]) == 0
    assert main(["train", *common, "--n-tokens", "1024", "--out", str(fresh)]) == 0
    assert main(["train", *common, "--n-tokens", "1024", "--init", str(first), "--out", str(cont)]) == 0
    nmse = {d.name: json.loads((d / "figures.json").read_text())["nmse"] for d in (first, fresh, cont)}
    assert nmse["cont"] < 0.8 * nmse["fresh"], nmse  # it did not start from scratch
    # it starts where the first run ended: the saved SAE is folded (input scale 1, decoder rows of
    # norm 1/s) and is unfolded before training; renormalizing the folded rows would shrink every
    # reconstruction by s and the first step would see a far worse NMSE than the first run's last
    ended = json.loads((first / "training_log.json").read_text())[-1]["nmse"]
    began = json.loads((cont / "training_log.json").read_text())[0]["nmse"]
    assert began < 1.3 * ended, (began, ended)
    a, b = load_sae(first), load_sae(cont)
    assert a.cfg.input_scale == b.cfg.input_scale
    assert b.cfg.metadata["training"]["init"] == {"from": str(first), "tokens_seen_before": 10240}
    assert f"init: {first}" in (cont / "train_config.yaml").read_text()  # it changes the weights: part of the recipe
    with pytest.raises(SystemExit, match="init SAE is 32x64, training 32x128"):
        main(["train", *common, "--d-sae", "128", "--n-tokens", "512", "--init", str(first), "--out", str(tmp_path / "bad")])


def test_train_cli_rejects_an_unknown_key(tmp_path):
    from saesteer.cli import main

    p = tmp_path / "run.json"
    p.write_text(json.dumps({"d_sae": 64, "widht": 3}))
    with pytest.raises(SystemExit, match="unknown config key 'widht'"):
        main(["train", "--config", str(p), "--out", str(tmp_path / "o")])


# -- post-hoc threshold calibration ----------------------------------------------------------------


def _random_batchtopk(d_in=32, d_sae=256, k=8, seed=0, input_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig("batchtopk", d_in, d_sae, k=k, input_scale=input_scale))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        sae.threshold.fill_(5.0)
    return sae.requires_grad_(False)


@pytest.mark.parametrize("target", [4.0, 8.0, 31.5])
def test_calibrated_threshold_hits_the_target_l0(target):
    from saesteer.sae.calibrate import calibrate_threshold, mean_l0
    from saesteer.sae.train import dataset_input_scale

    torch.set_num_threads(1)
    data = _synthetic(n=20_000, seed=4)
    sae = _random_batchtopk(input_scale=dataset_input_scale(data))
    calib, held = data[:10_000], data[10_000:]
    theta = calibrate_threshold(sae, calib, target, batch_size=3_000)  # several batches: the streaming path
    assert theta > 0 and torch.all(sae.threshold == theta)
    assert abs(mean_l0(sae, calib) - target) / target < 0.01
    assert abs(mean_l0(sae, held) - target) / target < 0.10
    assert sae.cfg.metadata["threshold_calibration"]["target_l0"] == target


def test_calibration_with_ties_and_unreachable_targets():
    from saesteer.sae.calibrate import calibrate_threshold, mean_l0

    torch.set_num_threads(1)
    sae = _random_batchtopk()
    base = _synthetic(n=1_000, seed=5)
    data = base.repeat_interleave(4, dim=0)  # every token four times: pre-activations tie in fours
    calibrate_threshold(sae, data, 8.1)  # 32_400 is not a multiple of 4: nearest reachable count wins
    assert abs(mean_l0(sae, data) * data.shape[0] - 8.1 * data.shape[0]) <= 2
    assert abs(mean_l0(sae, data) - mean_l0(sae, base)) < 1e-9
    with pytest.warns(UserWarning, match="fewer than target"):
        theta = calibrate_threshold(sae, base, 255.0)  # more than ever fire
    assert theta == 0.0
    with pytest.raises(ValueError, match="batchtopk or jumprelu"):
        calibrate_threshold(SAE(SAEConfig("topk", 32, 64, k=4)), base, 4)


def test_calibrate_cli_writes_the_sae_with_the_new_threshold(tmp_path, capsys):
    from saesteer.cli import main
    from saesteer.sae.activations import save_activations
    from saesteer.sae.io import load_sae, save_sae
    from saesteer.sae.calibrate import mean_l0
    from saesteer.sae.train import dataset_input_scale

    torch.set_num_threads(1)
    data = _synthetic(n=8_000, seed=6)
    sae = _random_batchtopk(input_scale=dataset_input_scale(data))
    save_sae(sae, tmp_path / "sae", dtype=torch.float32)
    save_activations(data, tmp_path / "acts.safetensors")
    assert main(["calibrate", str(tmp_path / "sae"), "--acts", str(tmp_path / "acts.safetensors"), "--l0", "12",
                 "--out", str(tmp_path / "cal")]) == 0
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert abs(report["l0_after"] - 12) / 12 < 0.01
    cal = load_sae(tmp_path / "cal")
    assert cal.cfg.architecture == "batchtopk" and abs(mean_l0(cal, data) - 12) / 12 < 0.01
    assert mean_l0(load_sae(tmp_path / "sae"), data) < 1  # the source folder is untouched (threshold 5)
