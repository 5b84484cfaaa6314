"""JVAE (gimVI's module): each dataset's likelihood against scipy, renormalisation, options."""

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit, logsumexp

from cellvi import keys
from cellvi.module import JVAE, JVAEConfig

TOTAL = 12
# dataset 0: genes 0..7 (a slice); dataset 1: genes 9, 2, 5, 11 (scattered, own order);
# dataset 2: genes 8..11
MAPPINGS = [list(range(8)), [9, 2, 5, 11], [8, 9, 10, 11]]


def module(likelihoods=("zinb", "nb", "poisson"), library=(True, False, False), **options):
    torch.manual_seed(0)
    n = len(likelihoods)
    return JVAE(
        dim_input_list=[len(m) for m in MAPPINGS[:n]], total_genes=TOTAL,
        indices_mappings=MAPPINGS[:n], gene_likelihoods=list(likelihoods),
        model_library_bools=list(library),
        library_log_means=[[5.0, 6.0], [3.0], [2.0]][:n],
        library_log_vars=[[0.5, 0.4], [1.0], [1.0]][:n],
        n_batch_list=[2, 1, 1][:n], n_latent=3, dim_hidden_encoder=16, **options)


def counts(mode, n=10, seed=0):
    g = torch.Generator().manual_seed(seed + mode)
    x = torch.poisson(torch.rand(n, len(MAPPINGS[mode]), generator=g) * 8)
    x[:, 0] += 1  # no empty cells: the observed library is their sum
    batch = torch.randint(0, [2, 1, 1][mode], (n, 1), generator=g)
    return {keys.X: x, keys.BATCH: batch, keys.LABELS: torch.zeros(n, 1, dtype=torch.long)}


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_each_datasets_likelihood_matches_scipy(mode):
    m = module().eval()
    t = counts(mode)
    torch.manual_seed(1)
    inf, gen, out = m(t, mode=mode, kl_weight=0.3)
    z, lib = inf["z"].detach(), inf["library"].detach().numpy()
    # the decoder's logits of every gene, renormalised over the dataset's genes only
    with torch.no_grad():
        logits = m.px_scale_decoder(z).numpy()  # (cells, TOTAL): the default decoder is linear
        zi_all = m.px_dropout_decoder(z).numpy()
    own = logits[:, MAPPINGS[mode]]
    scale = np.exp(own - logsumexp(own, axis=1, keepdims=True))
    mu = np.exp(lib) * scale + 1e-8
    x = t[keys.X].numpy()
    kind = m.gene_likelihoods[mode]
    if kind == "poisson":
        expected = stats.poisson.logpmf(x, mu).sum(1)
    else:
        offset = m.batch_offsets[mode]
        codes = t[keys.BATCH].numpy().ravel() + offset
        theta = np.exp(m.px_r.detach().numpy()[MAPPINGS[mode]][:, codes].T)
        log_nb = stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))
        if kind == "nb":
            expected = log_nb.sum(1)
        else:
            pi = expit(zi_all[:, MAPPINGS[mode]])
            zero = np.where(x == 0, np.log(pi), -np.inf)
            expected = np.logaddexp(zero, np.log1p(-pi) + log_nb).sum(1)
    np.testing.assert_allclose(-out.reconstruction_loss.detach().numpy(), expected, rtol=2e-5,
                               atol=2e-3)
    np.testing.assert_allclose(gen["px_scale"].detach().numpy(), scale, rtol=1e-5, atol=1e-7)
    # the loss: reconstruction plus both KL terms, warmed up (gimVI's rule)
    kl = out.kl_local["kl_z"] + out.kl_local["kl_l"]
    torch.testing.assert_close(out.loss, (out.reconstruction_loss + 0.3 * kl).mean())
    assert (out.kl_local["kl_l"] > 0).all() == m.model_library_bools[mode]
    if not m.model_library_bools[mode]:
        np.testing.assert_allclose(np.exp(lib).ravel(), x.sum(1), rtol=1e-6)


def test_library_prior_is_the_cells_batch():
    m = module().eval()
    t = counts(0, n=40)
    torch.manual_seed(2)
    inf, gen, out = m(t, mode=0)
    ql, pl = inf["ql"], gen["pl"]
    b = t[keys.BATCH].ravel().numpy()
    np.testing.assert_allclose(pl.loc.numpy().ravel(), np.array([5.0, 6.0])[b])
    expected = (np.log(np.sqrt(np.array([0.5, 0.4])[b])) - np.log(ql.scale.detach().numpy().ravel())
                + (ql.scale.detach().numpy().ravel() ** 2
                   + (ql.loc.detach().numpy().ravel() - np.array([5.0, 6.0])[b]) ** 2)
                / (2 * np.array([0.5, 0.4])[b]) - 0.5)
    np.testing.assert_allclose(out.kl_local["kl_l"].detach().numpy(), expected, rtol=1e-4,
                               atol=1e-5)


def test_impute_renormalises_over_the_decoding_datasets_genes():
    m = module().eval()
    t = counts(1)
    for decode in (None, 0, 1, 2):
        own = MAPPINGS[1 if decode is None else decode]
        scale = m.impute(t[keys.X], 1, t[keys.BATCH], decode_mode=decode)
        assert scale.shape == (10, TOTAL)
        torch.testing.assert_close(scale[:, own].sum(1), torch.ones(10))
        rate = m.impute(t[keys.X], 1, t[keys.BATCH], decode_mode=decode, normalized=False)
        torch.testing.assert_close(rate, scale * t[keys.X].sum(1, keepdim=True))
    # decoding the own genes is the generative model's scale (posterior mean of z)
    with torch.no_grad():
        inf = m.inference(t[keys.X], 1)
        gen = m.generative(inf["qz"].loc, inf["library"], t[keys.BATCH], mode=1)
    torch.testing.assert_close(m.impute(t[keys.X], 1)[:, MAPPINGS[1]], gen["px_scale"])
    sub = m.impute(t[keys.X], 1, genes=torch.tensor([3, 9]))
    torch.testing.assert_close(sub, m.impute(t[keys.X], 1)[:, [3, 9]])


def test_seed_api_and_samples():
    m = module().eval()
    t = counts(0)
    z = m.sample_from_posterior_z(t[keys.X], 0, deterministic=True)
    torch.testing.assert_close(z, m.inference(t[keys.X], 0)["qz"].loc)
    lib = m.sample_from_posterior_l(t[keys.X], 2 - 2, deterministic=True)
    assert lib.shape == (10, 1)
    inf = m.inference(t[keys.X], 0, n_samples=4)
    assert inf["z"].shape == (4, 10, 3) and inf["library"].shape == (4, 10, 1)
    gen = m.generative(inf["z"], inf["library"], t[keys.BATCH], mode=0)
    assert gen["px_rate"].shape == (4, 10, 8)
    rate = m.sample_rate(t[keys.X], 0, t[keys.BATCH], deterministic=True)
    scale = m.sample_scale(t[keys.X], 0, t[keys.BATCH], deterministic=True)
    assert rate.shape == scale.shape == (10, TOTAL)


@pytest.mark.parametrize("options", [
    {"dispersion": "gene"},
    {"dispersion": "gene-cell"},
    {"dispersion": "gene-label", "n_labels": 2, "label_maps": [[1], [0], [1]]},
    {"n_layers_decoder_individual": 1, "n_layers_decoder_shared": 1},
    {"n_layers_encoder_shared": 0, "n_layers_encoder_individual": 2},
    {"log_variational": False, "dropout_rate_encoder": 0.0},
])
def test_options_train(options):
    m = module(**options).train()
    for mode in range(3):
        out = m(counts(mode), mode=mode)[2]
        assert torch.isfinite(out.loss)
        out.loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def _loss_and_grads(m, fn, tensors, mode, weights=None):
    torch.manual_seed(3)
    z, out = fn(tensors, mode)
    if weights is None:
        out.loss.backward()
    else:  # a per-cell weighting of the reconstruction: a non-uniform upstream gradient
        (out.reconstruction_loss * weights).sum().backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    return z.detach(), out, grads


@pytest.mark.parametrize("options", [
    {"dispersion": "gene"},  # every dataset through the one-pass likelihood
    {"dispersion": "gene-batch", "dataset_gene_offsets": True},  # dataset 0 (2 batches): not
    {"dispersion": "gene-cell"},  # none: the dispersion varies between cells
])
@pytest.mark.parametrize("nonzero", [False, True])
def test_training_loss_is_forward(options, nonzero, monkeypatch):
    """The training step's loss: forward's value, gradients and random draws, cheaper."""
    from cellvi.module import jvae

    fused = []
    apply = jvae._RowsFromLogits.apply
    monkeypatch.setattr(jvae._RowsFromLogits, "apply",
                        lambda *a: fused.append(1) or apply(*a))
    m = module(**options).train()
    if m.gene_offsets is not None:
        with torch.no_grad():
            for p in m.gene_offsets:
                p.normal_()
    for mode in range(3):
        t = counts(mode)
        if nonzero:  # as the training loader gives them
            t[keys.INDICES_NONZERO] = torch.stack(torch.nonzero(t[keys.X], as_tuple=True))
        weights = torch.linspace(0.5, 2.0, 10)
        for w in (None, weights):
            z0, ref, g0 = _loss_and_grads(
                m, lambda t, d: (lambda o: (o[0]["z"], o[2]))(m(t, mode=d, kl_weight=0.3)),
                t, mode, w)
            z1, out, g1 = _loss_and_grads(
                m, lambda t, d: m.training_loss(t, mode=d, kl_weight=0.3), t, mode, w)
            torch.testing.assert_close(z1, z0, rtol=0, atol=0)  # the same random draws
            torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(out.reconstruction_loss, ref.reconstruction_loss,
                                       rtol=1e-6, atol=1e-5)
            for k in ("kl_z", "kl_l"):
                torch.testing.assert_close(out.kl_local[k], ref.kl_local[k], rtol=1e-5,
                                           atol=1e-6)
            assert set(g1) == set(g0)
            for k in g0:  # biases before a batch norm have ~0 gradients: absolute scale
                torch.testing.assert_close(g1[k], g0[k], rtol=1e-4,
                                           atol=1e-5 * (1 + float(g0[k].abs().max())))
    # the one-pass likelihood where the dispersion is one per gene (NB, ZINB; not Poisson)
    expected = {"gene": 2, "gene-batch": 1, "gene-cell": 0}[options["dispersion"]]
    assert len(fused) == 2 * expected


def test_gene_label_dispersion_uses_the_global_label():
    m = module(dispersion="gene-label", n_labels=2, label_maps=[[1], [0], [1]])
    theta = m._theta(None, None, torch.zeros(3, 1, dtype=torch.long),
                     m.gene_positions(1), 1)
    torch.testing.assert_close(theta, m.px_r[MAPPINGS[1], 0].exp().expand(3, 4))


def test_only_the_dataset_rows_of_the_output_layer_get_gradients():
    m = module().train()
    m(counts(1), mode=1)[2].loss.backward()
    g = m.px_scale_decoder.weight.grad
    rows = g.abs().sum(1) > 0
    assert rows.nonzero().ravel().tolist() == sorted(MAPPINGS[1])
    assert m.encoder_heads[0].linears[0].weight.grad is None  # other heads untouched


def test_config_errors_name_the_problem():
    base = dict(dim_input_list=[3, 2], total_genes=4, indices_mappings=[[0, 1, 2], [2, 3]],
                gene_likelihoods=["zinb", "nb"], model_library_bools=[False, False])
    JVAEConfig(**base)
    with pytest.raises(ValueError, match="gene_likelihoods\\[1\\]"):
        JVAEConfig(**{**base, "gene_likelihoods": ["zinb", "gaussian"]})
    with pytest.raises(ValueError, match="one per dataset"):
        JVAEConfig(**{**base, "model_library_bools": [False]})
    with pytest.raises(ValueError, match="positions"):
        JVAEConfig(**{**base, "indices_mappings": [[0, 1, 2], [2]]})
    with pytest.raises(ValueError, match="distinct positions"):
        JVAEConfig(**{**base, "indices_mappings": [[0, 1, 5], [2, 3]]})
    with pytest.raises(ValueError, match="library_log_means\\[0\\]"):
        JVAEConfig(**{**base, "model_library_bools": [True, False]})
    with pytest.raises(ValueError, match="dispersion"):
        JVAEConfig(**{**base, "dispersion": "cell"})
    with pytest.raises(ValueError, match="n_labels"):
        JVAEConfig(**{**base, "dispersion": "gene-label"})
    m = JVAE(JVAEConfig(**base))
    with pytest.raises(ValueError, match="mode must be a dataset index"):
        m.inference(torch.ones(2, 3), mode=2)
    with pytest.raises(ValueError, match="Dataset 1 has 2 genes"):
        m.inference(torch.ones(2, 3), mode=1)
    assert m.adversarial_shape() == (10, 2)
