"""SCANVAE and VAEC modules: shapes, the exact label marginalisation, options, bounds."""

import pytest
import torch

from cellvi import keys
from cellvi.module import SCANVAE, VAEC, Classifier
from cellvi.nn import Classifier as NNClassifier

N, G, K = 24, 30, 4


def batch(labels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(N, G, generator=g) * 6) + 1
    if labels is None:
        labels = torch.randint(0, K + 1, (N, 1), generator=g)  # code K = unlabelled
    return {
        keys.X: x,
        keys.BATCH: torch.randint(0, 2, (N, 1), generator=g),
        keys.LABELS: labels,
    }


def run(module, tensors, seed=1, **kwargs):
    torch.manual_seed(seed)
    return module(tensors, **kwargs)[2]


def test_classifier_is_reexported():
    assert Classifier is NNClassifier
    c = Classifier(5, n_hidden=8, n_labels=3).eval()
    p = c(torch.randn(4, 5))
    assert torch.allclose(p.sum(1), torch.ones(4))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_observed_lib_size": False, "library_log_means": [3.0, 3.0],
         "library_log_vars": [1.0, 1.0]},
        {"dispersion": "gene-label", "gene_likelihood": "nb"},
        {"latent_distribution": "ln"},
        {"y_prior": [0.1, 0.2, 0.3, 0.4], "classifier_parameters": {"n_layers": 0}},
        {"use_labels_groups": True, "labels_groups": [0, 0, 1, 1]},
        {"n_layers": 2, "use_layer_norm": "both", "use_batch_norm": "none"},
    ],
)
def test_scanvae_forward_and_classify(options):
    m = SCANVAE(G, n_batch=2, n_labels=K, n_hidden=16, n_latent=5, **options)
    t = batch()
    out = run(m, t, feed_labels=True, labelled_tensors=t, kl_weight=0.5)
    assert out.reconstruction_loss.shape == (N,)
    assert set(out.kl_local) >= {"kl_z1", "kl_z2", "kl_y"}
    assert torch.isfinite(out.loss) and "classification_loss" in out.extra
    out.loss.backward()
    assert m.label_head.classifier.classifier[-1].weight.grad is not None
    m.eval()
    p = m.classify(t[keys.X], t[keys.BATCH])
    assert p.shape == (N, K)
    assert torch.allclose(p.sum(1), torch.ones(N), atol=1e-5)
    assert m.classify(t[keys.X]).shape == (N, K)  # batch defaults to 0
    assert m.marginal_ll(t, n_mc_samples=4, n_mc_samples_per_pass=3).shape == (N,)


def test_scanvae_unlabelled_loss_is_exact_marginalisation():
    """-ELBO(x) = sum_y q(y|z1) [-ELBO(x, y)] - H(q(y|z1)), with the same posterior samples."""
    m = SCANVAE(G, n_batch=2, n_labels=K, n_hidden=16, n_latent=5).eval()
    x = batch()
    unl = run(m, {**x, keys.LABELS: torch.full((N, 1), K)}, feed_labels=True)
    per_label = [
        run(m, {**x, keys.LABELS: torch.full((N, 1), y)}, feed_labels=True).negative_elbo
        for y in range(K)
    ]
    per_label = torch.stack(per_label, 1)  # (cells, K)
    torch.manual_seed(1)
    z = m.inference(**m.inference_inputs(x))["z"]
    log_q = m.log_q_y(z)
    expected = (log_q.exp() * per_label).sum(1) + (log_q.exp() * log_q).sum(1)
    assert torch.allclose(unl.negative_elbo, expected, rtol=1e-4, atol=1e-3)
    # feed_labels=False ignores the labels
    fed_off = run(m, {**x, keys.LABELS: torch.zeros(N, 1, dtype=torch.long)}, feed_labels=False)
    assert torch.allclose(fed_off.negative_elbo, unl.negative_elbo, atol=1e-4)


def test_scanvae_labelled_loss_uses_the_prior_of_the_label():
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4])
    m = SCANVAE(G, n_batch=2, n_labels=K, n_hidden=16, n_latent=5, y_prior=prior).eval()
    t = batch(labels=torch.arange(N).remainder(K).unsqueeze(1))
    out = run(m, t, feed_labels=True)
    assert torch.allclose(out.kl_local["kl_y"], -prior.log()[t[keys.LABELS].reshape(-1)])
    # the KL weight scales the latent KL terms, not the reconstruction
    low = run(m, t, feed_labels=True, kl_weight=0.0)
    assert torch.allclose(low.loss, out.reconstruction_loss.mean(), rtol=1e-5)


def test_scanvae_hierarchical_classification():
    m = SCANVAE(G, n_batch=2, n_labels=K, n_hidden=16, n_latent=5,
                use_labels_groups=True, labels_groups=[0, 1, 1, 0]).eval()
    z = torch.randn(N, 5)
    p = m.log_q_y(z).exp()
    assert torch.allclose(p.sum(1), torch.ones(N), atol=1e-5)
    group_p = torch.softmax(m.label_head.classifier_groups(z), -1)
    assert torch.allclose(p[:, [0, 3]].sum(1), group_p[:, 0], atol=1e-5)
    assert torch.allclose(p[:, [1, 2]].sum(1), group_p[:, 1], atol=1e-5)


def test_scanvae_bad_options():
    with pytest.raises(ValueError, match="y_prior"):
        SCANVAE(G, n_labels=K, y_prior=[0.5, 0.5])
    with pytest.raises(ValueError, match="labels_groups"):
        SCANVAE(G, n_labels=K, use_labels_groups=True)
    with pytest.raises(ValueError, match="labels_groups"):
        SCANVAE(G, n_labels=K, use_labels_groups=True, labels_groups=[0, 0, 2, 2])
    with pytest.raises(ValueError, match="n_labels"):
        SCANVAE(G, n_labels=0)


def test_scanvae_marginal_ll_not_below_elbo():
    torch.manual_seed(0)
    m = SCANVAE(G, n_batch=2, n_labels=K, n_hidden=16, n_latent=5).eval()
    t = batch()
    elbo = -torch.stack([run(m, t, seed=s).negative_elbo for s in range(20)]).mean(0)
    ll = m.marginal_ll(t, n_mc_samples=200)
    assert ll.mean() >= elbo.mean() - 0.5, (ll.mean(), elbo.mean())


# ---------------------------------------------------------------------------- VAEC
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_observed_lib_size": False, "library_log_means": [3.0, 3.0],
         "library_log_vars": [1.0, 1.0], "encode_covariates": True},
        {"dispersion": "gene-label"},
        {"gene_likelihood": "poisson", "y_prior": [0.4, 0.3, 0.2, 0.1]},
    ],
)
def test_vaec_forward_and_classify(options):
    m = VAEC(G, n_batch=2, n_labels=K, n_hidden=16, n_latent=5, **options)
    t = batch()
    out = run(m, t, feed_labels=True, labelled_tensors=t)
    assert out.reconstruction_loss.shape == (N,) and torch.isfinite(out.loss)
    assert set(out.kl_local) >= {"kl_z", "kl_y"}
    out.loss.backward()
    m.eval()
    p = m.classify(t[keys.X])
    assert p.shape == (N, K) and torch.allclose(p.sum(1), torch.ones(N), atol=1e-5)
    inf = m.inference(**m.inference_inputs(t))
    assert inf["z"].shape == (N, 5)
    assert m.marginal_ll(t, n_mc_samples=3).shape == (N,)


def test_vaec_unlabelled_loss_is_exact_marginalisation():
    m = VAEC(G, n_batch=2, n_labels=K, n_hidden=16, n_latent=5).eval()
    x = batch()
    unl = run(m, {**x, keys.LABELS: torch.full((N, 1), K)}, feed_labels=True)
    # the enumerated forward draws one z per (class, cell): the same draws serve every call
    per_label = torch.stack(
        [run(m, {**x, keys.LABELS: torch.full((N, 1), y)}, feed_labels=True).negative_elbo
         for y in range(K)], 1)
    log_q = m.log_q_y(x[keys.X])
    expected = (log_q.exp() * per_label).sum(1) + (log_q.exp() * log_q).sum(1)
    assert torch.allclose(unl.negative_elbo, expected, rtol=1e-4, atol=1e-3)
