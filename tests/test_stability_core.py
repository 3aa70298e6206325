"""The stability knobs of the course core: qk-norm in the model, z-loss in the trainer, and the two numbers
each evaluation logs (the largest attention logit and the mean log Z). PyTorch is the answer key."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reglab.data import ClassificationTask, LMTask
from reglab.model import GPT, GPTConfig, RMSNorm
from reglab.train import (TrainConfig, log_partition, loss_fn, new_model, param_groups, stability_stats, train,
                          z_loss_term)


def _config(tiny_config, **changes):
    return GPTConfig(**{**tiny_config.__dict__, **changes})


def _scale_q_and_k(model: GPT, q_scale: float, k_scale: float):
    """Multiply the q and the k rows of every qkv projection (weight and bias) in place."""
    C = model.config.n_embd
    with torch.no_grad():
        for block in model.blocks:
            for param in (block.attn.qkv.weight, block.attn.qkv.bias):
                if param is not None:
                    param[:C] *= q_scale
                    param[C:2 * C] *= k_scale


def _lm_task(vocab_size=17, block_size=16, seed=0):
    stream = torch.randint(vocab_size, (2000,), generator=torch.Generator().manual_seed(seed))
    return LMTask(stream[:1500], stream[1500:], block_size=block_size, batch_size=4, eval_batches=2)


def _brute_force_max_logit(model: GPT, x: torch.Tensor) -> float:
    """The model's forward spelled out by hand up to each attention's logits q k^T / sqrt(hs), causally masked."""
    model.eval()
    B, T = x.shape
    C, nh = model.config.n_embd, model.config.n_head
    with torch.no_grad():
        h = model.tok_emb(x) + model.pos_emb(torch.arange(T))
        best = -math.inf
        for block in model.blocks:
            q, k, _ = block.attn.qkv(block.norm1(h)).split(C, dim=2)
            q = block.attn.q_norm(q.view(B, T, nh, C // nh).transpose(1, 2))
            k = block.attn.k_norm(k.view(B, T, nh, C // nh).transpose(1, 2))
            for b in range(B):
                for head in range(nh):
                    for i in range(T):
                        for j in range(i + 1):          # causal: key j <= query i
                            best = max(best, float(q[b, head, i] @ k[b, head, j]) / math.sqrt(C // nh))
            h = block(h)
    return best


# ------------------------------------------------------------------------------------------ qk-norm
def test_qk_norm_off_adds_identity_modules_and_no_parameters(tiny_config):
    model = new_model(tiny_config)
    attn = model.blocks[0].attn
    assert isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
    assert not any("q_norm" in key or "k_norm" in key for key in model.state_dict())
    x = torch.randn(2, 5, 2, 8)
    assert attn.q_norm(x) is x          # the same tensor back: the forward is today's, bit for bit


@pytest.mark.parametrize("norm, bias, kind", [("layernorm", True, nn.LayerNorm), ("layernorm", False, nn.LayerNorm),
                                              ("rmsnorm", False, RMSNorm)])
def test_qk_norm_on_adds_a_head_size_norm_of_the_config_kind(tiny_config, norm, bias, kind):
    model = new_model(_config(tiny_config, qk_norm=True, norm=norm, bias=bias))
    head_size = tiny_config.n_embd // tiny_config.n_head
    for block in model.blocks:
        for module in (block.attn.q_norm, block.attn.k_norm):
            assert isinstance(module, kind) and module.weight.shape == (head_size,)
            assert (getattr(module, "bias", None) is not None) == (bias and norm == "layernorm")


def test_qk_norm_leaves_every_other_initial_weight_unchanged(tiny_config):
    """The norms draw nothing from the random stream: the same seed gives the same other weights."""
    off, on = new_model(tiny_config).state_dict(), new_model(_config(tiny_config, qk_norm=True)).state_dict()
    assert set(off) < set(on) and all(torch.equal(off[key], on[key]) for key in off)
    assert all("q_norm" in key or "k_norm" in key for key in set(on) - set(off))


def test_qk_norm_gains_are_in_the_no_decay_group(tiny_config):
    model = new_model(_config(tiny_config, qk_norm=True))
    decay, no_decay = param_groups(model, 0.1)          # raises if the type and dimension rules disagree
    gains = {id(block.attn.q_norm.weight) for block in model.blocks} | {id(block.attn.k_norm.weight) for block in model.blocks}
    assert gains <= {id(p) for p in no_decay["params"]} and not gains & {id(p) for p in decay["params"]}


def test_spelled_out_attention_equals_sdpa_with_qk_norm(tiny_config, tokens):
    sdpa = new_model(_config(tiny_config, qk_norm=True)).eval()
    explicit = new_model(_config(tiny_config, qk_norm=True, use_sdpa=False)).eval()
    with torch.no_grad():
        for model in (sdpa, explicit):
            _scale_q_and_k(model, 30.0, 30.0)
            for block in model.blocks:              # gains away from 1 so the norms' weights matter
                block.attn.q_norm.weight.mul_(1.5)
                block.attn.k_norm.weight.mul_(0.7)
        assert torch.allclose(sdpa(tokens), explicit(tokens), atol=1e-5)


@pytest.mark.parametrize("norm, bias", [("layernorm", True), ("layernorm", False), ("rmsnorm", False)])
def test_qk_normed_logits_obey_the_cauchy_schwarz_bound(tiny_config, tokens, norm, bias):
    """After the norm, q = g * q_hat + b with ||q_hat|| <= sqrt(hs) (unit variance or unit mean square, less
    eps), so ||q|| <= max|g| sqrt(hs) + ||b|| and |q.k| / sqrt(hs) <= ||q|| ||k|| / sqrt(hs), whatever W_q is."""
    model = new_model(_config(tiny_config, qk_norm=True, norm=norm, bias=bias))
    hs = tiny_config.n_embd // tiny_config.n_head
    torch.manual_seed(3)
    with torch.no_grad():
        for block in model.blocks:
            for module in (block.attn.q_norm, block.attn.k_norm):
                module.weight.copy_(torch.randn(hs) * 2)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.randn(hs))
    _scale_q_and_k(model, 1000.0, 1000.0)

    def norm_bound(module):
        bias_norm = module.bias.detach().norm() if getattr(module, "bias", None) is not None else 0.0
        return float(module.weight.detach().abs().max()) * math.sqrt(hs) + float(bias_norm)
    bound = max(norm_bound(b.attn.q_norm) * norm_bound(b.attn.k_norm) for b in model.blocks) / math.sqrt(hs)
    measured = stability_stats(model, tokens)["max_attn_logit"]
    assert measured <= bound * (1 + 1e-5), f"max logit {measured:.4g} above the bound {bound:.4g}"
    # and without qk-norm the same scaling sends the logits far past that bound
    plain = new_model(tiny_config)
    _scale_q_and_k(plain, 1000.0, 1000.0)
    assert stability_stats(plain, tokens)["max_attn_logit"] > 10 * bound


def test_scaling_w_q_leaves_qk_normed_attention_unchanged(tiny_config, tokens):
    """LayerNorm(c q) = LayerNorm(q) for c > 0 when eps = 0 (the mean and the std both scale by c)."""
    x = torch.randn(4, 16, tiny_config.n_embd, generator=torch.Generator().manual_seed(0))   # (B, T, C)
    for qk_norm, should_change in ((True, False), (False, True)):
        attn = new_model(_config(tiny_config, qk_norm=qk_norm)).blocks[0].attn.eval()
        if qk_norm:
            attn.q_norm.eps = attn.k_norm.eps = 0.0
        with torch.no_grad():
            before = attn(x)
            attn.qkv.weight[:tiny_config.n_embd] *= 100.0
            attn.qkv.bias[:tiny_config.n_embd] *= 100.0
            after = attn(x)
        # float32 round-off, relative to the output's size
        same = torch.allclose(before, after, atol=1e-5 * float(before.abs().max()), rtol=0)
        assert same != should_change, f"qk_norm={qk_norm}"


# ------------------------------------------------------------------------------------------ z-loss
def test_z_loss_term_is_the_mean_squared_logsumexp():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)) * 4 + 2
    answer = torch.stack([torch.logsumexp(row, dim=0) ** 2 for row in logits.reshape(-1, 11)]).mean()
    assert torch.allclose(z_loss_term(logits), answer, rtol=1e-6)
    assert torch.allclose(log_partition(logits), torch.logsumexp(logits, dim=-1).reshape(-1))


def test_z_loss_gradient_is_two_log_z_times_softmax_over_n():
    logits = (torch.randn(6, 9, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_()
    z_loss = 1e-4
    (z_loss * z_loss_term(logits)).backward()
    z = logits.detach().double()                        # the formula in float64, autograd's in float32
    formula = 2 * z_loss * torch.logsumexp(z, dim=-1, keepdim=True) * F.softmax(z, dim=-1) / logits.size(0)
    assert torch.allclose(logits.grad, formula.float(), rtol=1e-5)


def test_loss_fn_adds_the_z_term_and_is_unchanged_at_zero():
    logits = torch.randn(4, 7, 13, generator=torch.Generator().manual_seed(2)) * 5
    targets = torch.randint(13, (4, 7), generator=torch.Generator().manual_seed(3))
    plain = F.cross_entropy(logits.reshape(-1, 13), targets.reshape(-1), label_smoothing=0.1)
    assert torch.equal(loss_fn(logits, targets, 0.1), loss_fn(logits, targets, 0.1, z_loss=0.0))
    assert torch.allclose(loss_fn(logits, targets, 0.1), plain)
    assert torch.allclose(loss_fn(logits, targets, 0.1, z_loss=1e-2), plain + 1e-2 * z_loss_term(logits))


def test_negative_z_loss_is_refused_with_its_message():
    with pytest.raises(ValueError, match="z_loss must be >= 0, got -0.001"):
        TrainConfig(z_loss=-1e-3)


def test_history_loss_is_the_backpropagated_loss_with_the_z_term(tiny_config):
    task = _lm_task()
    config = TrainConfig(steps=1, warmup_steps=0, z_loss=0.5, eval_every=1, progress=False)
    x, y = task.train_batch(0, torch.Generator().manual_seed(config.seed))
    model = new_model(tiny_config)
    with torch.no_grad():
        expected, plain = float(loss_fn(model(x), y, 0.0, 0.5)), float(loss_fn(model(x), y))
    history = train(new_model(tiny_config), task, config)
    assert history.loss[0] == pytest.approx(expected, rel=1e-6)
    assert history.loss[0] > plain + 0.1   # the z term is in it: 0.5 log^2 Z with log Z ~ log 17


# ------------------------------------------------------------------------------------------ logged stats
@pytest.mark.parametrize("qk_norm", [False, True])
def test_max_attn_logit_matches_a_brute_force_computation(tiny_config, tokens, qk_norm):
    model = new_model(_config(tiny_config, qk_norm=qk_norm, use_sdpa=False))
    _scale_q_and_k(model, 5.0, 3.0)                     # logits of order one, not 1e-3
    expected = _brute_force_max_logit(model, tokens)
    assert stability_stats(model, tokens)["max_attn_logit"] == pytest.approx(expected, rel=1e-5)
    sdpa = new_model(_config(tiny_config, qk_norm=qk_norm))   # the hooks see the same q, k on the fused path
    _scale_q_and_k(sdpa, 5.0, 3.0)
    assert stability_stats(sdpa, tokens)["max_attn_logit"] == pytest.approx(expected, rel=1e-5)


def test_log_z_is_the_mean_logsumexp_of_the_model_output(tiny_config, tokens):
    model = new_model(tiny_config)
    with torch.no_grad():
        model.head.weight.mul_(20)                      # move log Z away from log V
        expected = float(torch.logsumexp(model.eval()(tokens), dim=-1).mean())
    model.train()
    stats = stability_stats(model, tokens)
    assert stats["log_z"] == pytest.approx(expected, rel=1e-6)
    assert model.training, "stability_stats must restore train mode"
    assert not any(m._forward_hooks for m in model.modules()), "stability_stats must remove its hooks"


def test_each_language_model_evaluation_logs_the_stability_numbers(tiny_config):
    task = _lm_task()
    model = new_model(tiny_config)
    history = train(model, task, TrainConfig(steps=4, warmup_steps=0, eval_every=2, progress=False))
    x = next(iter(task.eval_batches("val")))[0]
    for record in history.evals:
        assert {"max_attn_logit", "log_z"} <= set(record)
    assert history.final == {**history.final, **stability_stats(model, x)}


def test_classifier_evaluations_do_not_log_the_stability_numbers(tiny_config, tokens):
    task = ClassificationTask({"train": (tokens, tokens[:, 0] % 5), "val": (tokens, tokens[:, 0] % 5)})
    history = train(new_model(_config(tiny_config, n_classes=5)), task,
                    TrainConfig(steps=2, warmup_steps=0, eval_every=2, progress=False))
    assert not {"max_attn_logit", "log_z"} & set(history.final)
