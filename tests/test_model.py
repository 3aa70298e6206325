"""The course model: dropout is on in train mode and off in eval at every site, SDPA included."""
import math

import pytest
import torch

from reglab.model import DROPOUT_SITES, GPT, GPTConfig, RMSNorm


def _model(config, seed=0):
    torch.manual_seed(seed)
    return GPT(config)


@pytest.mark.parametrize("site", DROPOUT_SITES)
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_dropout_is_identity_in_eval_mode_and_active_in_train_mode(tiny_config, tokens, site, use_sdpa):
    config = GPTConfig(**{**tiny_config.__dict__, "use_sdpa": use_sdpa}).with_dropout(0.5, sites=(site,))
    model = _model(config)
    model.eval()
    assert torch.equal(model(tokens), model(tokens)), f"eval forward is random with {site}"
    model.train()
    torch.manual_seed(1)
    first = model(tokens)
    second = model(tokens)
    assert not torch.allclose(first, second), f"{site} does nothing in train mode"


def test_attention_dropout_inside_sdpa_follows_train_mode(tiny_config, tokens):
    """SDPA takes dropout_p as a float: the model must pass 0 in eval (a bug well-known code shipped)."""
    model = _model(tiny_config.with_dropout(0.5, sites=("attn_dropout",)))
    no_dropout = _model(tiny_config)
    model.eval()
    no_dropout.eval()
    assert torch.equal(model(tokens), no_dropout(tokens))


def test_sdpa_and_explicit_attention_agree_without_dropout(tiny_config, tokens):
    sdpa = _model(tiny_config).eval()
    explicit = _model(GPTConfig(**{**tiny_config.__dict__, "use_sdpa": False})).eval()
    torch.testing.assert_close(sdpa(tokens), explicit(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("site", DROPOUT_SITES)
def test_dropout_preserves_the_expected_activation_at_each_site(tiny_config, tokens, site):
    """E[dropout(h)] = h: the mean of many train-mode forwards approaches the eval forward.

    The logits are a smooth function of the dropped activations, so the match is approximate; with
    p = 0.1 and 2000 samples the mean's deviation is far below the tolerance (the tolerance is a
    tenth of the logits' scale; the Monte-Carlo error alone is ~std/sqrt(2000) < 1% of it).
    """
    model = _model(tiny_config.with_dropout(0.1, sites=(site,)))
    model.eval()
    expected = model(tokens[:1])
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        mean = torch.stack([model(tokens[:1]) for _ in range(2000)]).mean(0)
    scale = expected.abs().mean()
    assert (mean - expected).abs().mean() < 0.1 * scale


@pytest.mark.parametrize("site", DROPOUT_SITES)
def test_each_site_drops_at_its_configured_rate_with_inverted_scaling_and_no_other_site_drops(site):
    """Hooks on every nn.Dropout of the model (explicit attention, so the attention site is a module too):
    the modules of the configured site zero a fraction p of their input and multiply the rest by
    1 / (1 - p); every other dropout module passes its input through unchanged."""
    p = 0.3
    config = GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=32, use_sdpa=False)
    model = GPT(config.with_dropout(p, sites=(site,))).train()
    seen = {}                                   # module name -> (input, output)

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, (inputs[0].detach(), output.detach()))    # the first block's call of each
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(record(name))
    torch.manual_seed(0)
    model(torch.randint(17, (8, 16), generator=torch.Generator().manual_seed(1)))
    active = {name for name in seen if name.split(".")[-1] == site}
    assert active, f"no dropout module is named {site}"
    kept, total = 0, 0
    for name, (inp, out) in seen.items():
        if name in active:
            nonzero = inp != 0
            survived = out[nonzero] != 0
            torch.testing.assert_close(out[nonzero][survived], inp[nonzero][survived] / (1 - p))
            kept, total = kept + int(survived.sum()), total + int(nonzero.sum())
        else:
            torch.testing.assert_close(out, inp, rtol=0, atol=0)
    # kept ~ Binomial(total, 1 - p): 5 standard deviations -> a false failure below 1e-6
    assert abs(kept / total - (1 - p)) < 5 * math.sqrt(p * (1 - p) / total)


def test_rmsnorm_matches_its_definition():
    x = torch.randn(3, 5, 8)
    norm = RMSNorm(8)
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("norm,mlp", [("layernorm", "gelu"), ("rmsnorm", "swiglu")])
def test_model_shapes_for_language_model_and_classifier(tiny_config, tokens, norm, mlp):
    lm = _model(GPTConfig(**{**tiny_config.__dict__, "norm": norm, "mlp": mlp}))
    assert lm(tokens).shape == (4, 16, 17)
    for pool in ("last", "mean"):
        clf = _model(GPTConfig(**{**tiny_config.__dict__, "n_classes": 5, "pool": pool}))
        assert clf(tokens).shape == (4, 5)


def test_bad_config_values_are_refused_with_what_was_given():
    with pytest.raises(ValueError, match=r"resid_dropout must be in \[0, 1\), got 1.0"):
        GPTConfig(resid_dropout=1.0)
    with pytest.raises(ValueError, match="n_embd \\(10\\) must be divisible by n_head \\(4\\)"):
        GPTConfig(n_embd=10, n_head=4)
    with pytest.raises(ValueError, match="norm must be 'layernorm' or 'rmsnorm', got 'batchnorm'"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="unknown dropout sites \\['attention'\\]"):
        GPTConfig().with_dropout(0.1, sites=("attention",))


def test_generate_is_deterministic_greedy_and_respects_top_k(tiny_config, tokens):
    model = _model(tiny_config).eval()
    prompt = tokens[:2, :4]
    greedy = model.generate(prompt, 5, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 5, temperature=0))
    assert greedy.shape == (2, 9)
    top1 = model.generate(prompt, 5, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, greedy), "top-k with k = 1 is greedy decoding"
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        model.generate(prompt, 1, temperature=-1)


def test_sequence_longer_than_block_size_is_refused(tiny_config):
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        _model(tiny_config)(torch.zeros(1, 17, dtype=torch.long))
