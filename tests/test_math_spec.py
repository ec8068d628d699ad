"""The merge math against the spec: section 6's properties, the integer tables, and an
independent float64 reference at 1e-4 relative Frobenius error."""

from __future__ import annotations

import math

import pytest
import torch

import spec_reference as ref
from pipeline.errors import InputError
from pipeline.methods import get_method, merge_key, numerics_log, svd
from pipeline.methods import linalg
from pipeline.methods.isotropic import iso_c, iso_cts, iso_cts_dimensions
from pipeline.methods.ties import (RadixSelect, digit_histograms, kept_rank, reference_thresholds,
                                   reference_ties)
from pipeline.methods.tsv import tsv_c, tsv_c_reconstruct, tsv_m, tsv_rank

SHAPES = [(40, 40), (64, 32), (32, 64)]  # square, tall, wide
TASKS = [1, 2, 3, 8]
MATRIX_METHODS = {"tsv_m": tsv_m, "iso_c": iso_c, "iso_cts": iso_cts}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def full_rank(T, m, n, seed=0, dtype=torch.float32):
    return torch.randn(T, m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def finetune_like(T, m, n, seed=0, rank=6):
    """Low-rank task updates with a decaying spectrum plus noise: well conditioned, realistic."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(T):
        u = torch.linalg.qr(torch.randn(m, rank, generator=g))[0]
        v = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
        out.append((u * torch.logspace(0, -1, rank)) @ v.T + 0.02 * torch.randn(m, n, generator=g))
    return torch.stack(out)


# -- section 6 properties ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("name", sorted(MATRIX_METHODS))
def test_sign_scale_and_order_properties(name, T, shape):
    fn = MATRIX_METHODS[name]
    d = full_rank(T, *shape, seed=T, dtype=torch.float64)
    out = fn(d)
    assert out.shape == shape
    assert rel(fn(-d), -out) < 1e-10, "f(-x) = -f(x)"
    assert rel(fn(2.5 * d), 2.5 * out) < 1e-10, "f(c x) = c f(x)"
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(1))
    assert rel(fn(d[perm]), out) < 1e-8, "invariant to task order"


@pytest.mark.parametrize("shape", SHAPES)
def test_tsv_m_of_one_task_is_the_task_exactly(shape):
    d = full_rank(1, *shape)
    assert torch.equal(tsv_m(d), d[0])


@pytest.mark.parametrize("shape", SHAPES)
def test_iso_cts_of_one_task_is_iso_c(shape):
    d = full_rank(1, *shape, dtype=torch.float64)
    assert rel(iso_cts(d), iso_c(d)) < 1e-10


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_isotropic_outputs_have_a_flat_spectrum(name, T, shape):
    out = MATRIX_METHODS[name](full_rank(T, *shape, dtype=torch.float64))
    s = torch.linalg.svdvals(out)
    # Polar factors come from float64 Gram matrices: orthonormal to ~eps * cond^2, and these
    # square Gaussian sums have cond ~1e2-1e3.
    assert float((s.max() - s.min()) / s.mean()) < 1e-8


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [2, 3, 8])
def test_tsv_m_keeps_each_tasks_top_singular_values(T, shape):
    d = full_rank(T, *shape, dtype=torch.float64)
    k = min(shape) // T
    kept = torch.cat([torch.linalg.svdvals(d[t])[:k] for t in range(T)])
    expected = torch.cat([kept, torch.zeros(min(shape) - T * k, dtype=torch.float64)])
    got = torch.linalg.svdvals(tsv_m(d))
    assert torch.allclose(got, expected.sort(descending=True).values, atol=1e-10)


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts", "tsv_c"])
def test_keys_without_svd_treatment_get_the_task_mean(name):
    method = get_method(name)
    params = method.resolve_params({})
    for key, d in [("ln.weight", torch.randn(3, 16)), ("conv.weight", torch.randn(3, 4, 3, 2, 2)),
                   ("model.text_projection", torch.randn(3, 8, 6)), ("scale", torch.randn(3))]:
        merged = merge_key(method, key, d, params) if name != "tsv_c" else d.mean(0)
        assert torch.allclose(merged, d.sum(0) / 3), key
    assert torch.equal(merge_key(get_method("iso_c"), "w", torch.zeros(3, 8, 6), {}),
                       torch.zeros(8, 6)), "all-zero task vectors merge to zero"


def test_custom_exclusions_route_a_matrix_to_the_mean():
    d = torch.randn(2, 8, 6)
    merged = merge_key(get_method("iso_c"), "head.weight", d, {}, exclude=("head",))
    assert torch.allclose(merged, d.mean(0))


@pytest.mark.parametrize("name", ["average", "task_arithmetic"])
def test_linear_baselines_sum_the_task_vectors(name):
    d = torch.randn(4, 5, 3, dtype=torch.float64)
    method = get_method(name)
    assert torch.allclose(merge_key(method, "w", d, {}), d.sum(0))
    assert rel(merge_key(method, "w", 3 * d, {}), 3 * d.sum(0)) < 1e-12


# -- integer arithmetic ------------------------------------------------------------------------
@pytest.mark.parametrize("r,T,c,p", [(1024, 8, 816, 26), (768, 14, 614, 11), (96, 8, 80, 2),
                                     (50, 20, 50, 0), (257, 20, 197, 3)])
def test_iso_cts_dimension_table_of_the_spec(r, T, c, p):
    assert iso_cts_dimensions(r, T, 0.8) == (c, p)


@pytest.mark.parametrize("r,T,f,c,p", [
    # r=100, f=0.8: c0=80; (100-80)/8 = 2.5 -> round half to even -> 2 -> ts=16, c=84, p=2
    (100, 8, 0.8, 84, 2),
    # (100-80)/40 = 0.5 -> 0 -> ts=0: everything common
    (100, 40, 0.8, 100, 0),
    # r=60, f=0.5: c0=30; 30/20 = 1.5 -> 2 -> ts=40, c=20, p=2
    (60, 20, 0.5, 20, 2),
    # r=70, f=0.5: c0=35; 35/10 = 3.5 -> 4 -> ts=40, c=30, p=4
    (70, 10, 0.5, 30, 4),
])
def test_iso_cts_dimensions_round_half_to_even(r, T, f, c, p):
    assert iso_cts_dimensions(r, T, f) == (c, p)
    assert c + T * p == r


@pytest.mark.parametrize("m,n,T,k", [(768, 3072, 8, 96), (1024, 1024, 8, 128), (768, 768, 3, 256),
                                     (769, 800, 3, 256), (767, 768, 3, 255), (50, 60, 20, 2),
                                     (10, 10, 20, 0), (257, 300, 20, 12)])
def test_tsv_rank_is_floor_of_r_over_T(m, n, T, k):
    assert tsv_rank(m, n, T) == k


def test_tsv_rank_matches_floor_everywhere():
    for r in range(1, 1100):
        for T in range(1, 33):
            assert tsv_rank(r, r + 1, T) == math.floor(r / T)


# -- independent float64 reference -----------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES + [(96, 48)])
@pytest.mark.parametrize("T", [2, 3, 8])
@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts"])
def test_float32_matches_float64_reference(name, T, shape):
    d = finetune_like(T, *shape, seed=10 * T + shape[0])
    got = MATRIX_METHODS[name](d)
    assert got.dtype == torch.float32
    assert rel(got, getattr(ref, name)(d)) <= 1e-4


@pytest.mark.parametrize("f", [0.5, 0.8, 0.95])
def test_iso_cts_fraction_matches_reference(f):
    d = finetune_like(4, 48, 40, seed=3)
    assert rel(iso_cts(d, common_space_fraction=f), ref.iso_cts(d, f)) <= 1e-4


@pytest.mark.parametrize("T", [2, 3, 8])
def test_tsv_c_factors_reconstruct_the_rank_k_truncation(T):
    d = finetune_like(T, 64, 40, seed=T)
    factors = tsv_c(d)
    k = 40 // T
    assert factors["U"].shape == (T, 64, k) and factors["S"].shape == (T, k)
    assert factors["Vh"].shape == (T, k, 40)
    stored = sum(t[0].numel() for t in factors.values())
    assert stored == k * (64 + 40 + 1)
    expected = ref.tsv_c(d)
    for t in range(T):
        got = tsv_c_reconstruct({name: f[t] for name, f in factors.items()})
        assert rel(got, expected[t]) <= 1e-4


# -- TIES ------------------------------------------------------------------------------------
def model_vectors(T=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(T, 12, 8, generator=g, dtype=dtype),
            "a.bias": torch.randn(T, 12, generator=g, dtype=dtype),
            "b.weight": torch.randn(T, 5, 7, generator=g, dtype=dtype),
            "c.scale": torch.randn(T, generator=g, dtype=dtype)}


@pytest.mark.parametrize("k", [5, 20, 50, 100])
@pytest.mark.parametrize("merge_func", ["mean", "sum", "max"])
def test_ties_matches_independent_reference(k, merge_func):
    vectors = model_vectors(dtype=torch.float64)
    got = reference_ties(vectors, k=k, merge_func=merge_func)
    expected = ref.ties(vectors, k=k, merge_func=merge_func)
    for key in vectors:
        assert torch.allclose(got[key], expected[key], atol=1e-12), key


def test_ties_k_100_keeps_every_entry():
    vectors = model_vectors()
    assert kept_rank(1000, 100) == 0
    assert torch.equal(reference_thresholds(vectors, 100), torch.zeros(3))


def test_ties_trim_is_global_not_per_key():
    """A key with tiny values loses all of them when trimming is global."""
    vectors = {"big": torch.full((2, 90), 5.0), "small": torch.full((2, 10), 0.001)}
    merged = reference_ties(vectors, k=50)
    assert torch.equal(merged["small"], torch.zeros(10))
    assert torch.equal(merged["big"], torch.full((90,), 5.0))


def test_ties_zero_elected_sign_takes_the_majority_sign():
    # Position 0: +1 and -1 cancel -> g = 0 -> majority sign of the model (+) keeps the +1.
    vectors = {"w": torch.tensor([[1.0, 2.0, 3.0], [-1.0, 2.0, 3.0]])}
    merged = reference_ties(vectors, k=100)
    assert torch.equal(merged["w"], torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("params", [{"k": 0}, {"k": 101}, {"merge_func": "median"},
                                    {"k": "abc"}])
def test_ties_rejects_bad_parameters(params):
    with pytest.raises(InputError):
        get_method("ties").resolve_params(params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 20, 73.5, 100])
def test_radix_select_over_shards_is_exactly_kthvalue(dtype, k):
    vectors = model_vectors(T=4, seed=7, dtype=dtype)
    vectors["dups"] = torch.tensor([0.5, 0.5, 0.0, -0.0, 0.5, 0.25], dtype=dtype).repeat(4, 1)
    vectors["zeros"] = torch.zeros(4, 9, dtype=dtype)
    expected = reference_thresholds(vectors, k)
    n = sum(v[0].numel() for v in vectors.values())
    select = RadixSelect(4, kept_rank(n, k), dtype)
    shards = [["a.bias", "zeros"], ["a.weight"], ["b.weight", "c.scale", "dups"]]
    while not select.done:
        for shard in shards:
            flat = torch.cat([vectors[key].reshape(4, -1) for key in shard], dim=1)
            select.add(digit_histograms(flat, select.level, select.prefixes))
        select.advance()
    assert torch.equal(select.thresholds(), expected)


# -- the float64 Gram fast paths on realistic and hard spectra -----------------------------------
def power_law_tasks(T, m, n, seed=0, decay=0.7):
    """Full-rank tasks with power-law spectra and a shared part, like real fine-tuning deltas."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    scale = torch.arange(1, r + 1, dtype=torch.float32) ** -decay

    def draw():
        return (torch.randn(m, r, generator=g) * scale) @ torch.randn(r, n, generator=g)
    shared = draw()
    return torch.stack([0.5 * shared + draw() for _ in range(T)])


def cancelling_tasks(T, m, n, seed=0, floor=1e-4):
    """Tasks whose parts cancel in the sum: the summed matrix has 2 T strong directions and a
    tail of singular values `floor` times smaller (a near-rank-deficient sum)."""
    g = torch.Generator().manual_seed(seed)
    strong = [torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g) for _ in range(T)]
    cancel = torch.randn(T, m, n, generator=g)
    cancel -= cancel.mean(0)
    tail = floor * torch.randn(T, m, n, generator=g)
    return (torch.stack(strong) + cancel + tail).double().float()


FAST_PATH_SHAPES = [(96, 96), (160, 64), (64, 160)]  # square, tall (n-side Gram), wide


@pytest.mark.parametrize("shape", FAST_PATH_SHAPES)
@pytest.mark.parametrize("T", [3, 8])
@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts"])
def test_fast_paths_match_float64_spec_on_power_law_spectra(name, T, shape):
    d = power_law_tasks(T, *shape, seed=T + shape[0])
    with numerics_log() as log:
        got = MATRIX_METHODS[name](d)
    assert got.dtype == torch.float32
    assert rel(got, getattr(ref, name)(d)) <= 1e-5  # ten times tighter than the spec asks
    assert log.events == []  # well-conditioned: no fallback needed


@pytest.mark.parametrize("shape", FAST_PATH_SHAPES)
@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_near_rank_deficient_sums_match_float64_spec(name, shape):
    """The flattening gives the tail directions full weight, so they must be right too; the
    float32 reference SVD is not (it is shown to miss by far more than our result)."""
    d = cancelling_tasks(4, *shape, seed=shape[1])
    s = torch.linalg.svdvals(d.double().sum(0))
    assert float(s[-1] / s[0]) < 1e-3  # the sum really is near rank-deficient
    expected = getattr(ref, name)(d)
    got = MATRIX_METHODS[name](d)
    assert rel(got, expected) <= 1e-4
    assert rel(got, expected) < rel(getattr(ref, name)(d, dtype=torch.float32), expected)


@pytest.mark.parametrize("shape", FAST_PATH_SHAPES)
@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts"])
def test_untrusted_gram_falls_back_to_float64_svd_and_records_it(name, shape):
    """Singular values 1e-7 of the largest (in the sum, or among a task's top k) are beyond
    what a float64 Gram resolves."""
    m, n = shape
    g = torch.Generator().manual_seed(5)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    spectrum = torch.logspace(0, -14 if name == "tsv_m" else -7, r, dtype=torch.float64)
    d = torch.stack([(u * spectrum) @ v.T, (u * spectrum.flip(0)) @ v.T * 1e-9])
    with numerics_log() as log:
        got = MATRIX_METHODS[name](d)
    assert any("float64 SVD" in event for event in log.events), log.events
    assert rel(got, getattr(ref, name)(d)) <= 1e-6


def spectrum_matrix(m, n, spectrum, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    return (u * spectrum) @ v.T


def top_k_product(x, k):
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def spy_mixed(monkeypatch):
    outcomes = []
    real = linalg._top_svd_mixed

    def spy(*args):
        found = real(*args)
        outcomes.append(found is not None)
        return found

    monkeypatch.setattr(linalg, "_top_svd_mixed", spy)
    return outcomes


@pytest.mark.parametrize("shape", [(384, 256), (256, 384), (256, 256)])
def test_mixed_precision_top_svd_matches_float64_truncation(monkeypatch, shape):
    """A power-law spectrum like a fine-tune's: the float32 Gram finds the subspace, the
    float64 Rayleigh-Ritz step makes the vectors orthonormal and the values float64-exact;
    the product is as close as a float32 SVD's."""
    r = min(shape)
    spectrum = torch.arange(1, r + 1, dtype=torch.float64) ** -1.0
    x = spectrum_matrix(*shape, spectrum, seed=r).float()
    outcomes = spy_mixed(monkeypatch)
    u, s, vh = linalg.top_svd(x, 32, float32_subspace=True)
    assert outcomes == [True]
    assert u.dtype == s.dtype == vh.dtype == torch.float64
    assert u.shape == (shape[0], 32) and vh.shape == (32, shape[1])
    assert rel((u * s) @ vh, top_k_product(x, 32)) <= 1e-5
    assert rel(u.mT @ u, torch.eye(32, dtype=torch.float64)) <= 1e-12
    assert rel(vh @ vh.mT, torch.eye(32, dtype=torch.float64)) <= 1e-12
    # Ritz values are exact to second order: the float64 step is what makes them this good.
    exact = torch.linalg.svdvals(x.double())[:32]
    assert float((s - exact).abs().max()) <= 1e-9 * float(exact[0])


def test_mixed_precision_is_not_trusted_on_a_steep_spectrum(monkeypatch):
    """Past k + p the directions sit below float32's reach: the float64 Gram is used."""
    spectrum = torch.logspace(0, -12, 256, dtype=torch.float64)
    x = spectrum_matrix(384, 256, spectrum, seed=1).float()
    outcomes = spy_mixed(monkeypatch)
    u, s, vh = linalg.top_svd(x, 32, float32_subspace=True)
    assert outcomes == [False]
    assert rel((u * s) @ vh, top_k_product(x, 32)) <= 1e-6


@pytest.mark.parametrize("T", [3, 4, 8])
def test_tsv_c_uses_the_mixed_path_and_matches_float64_spec(monkeypatch, T):
    d = power_law_tasks(T, 384, 256, seed=T)
    outcomes = spy_mixed(monkeypatch)
    factors = tsv_c(d)
    assert outcomes == [True] * T
    got = torch.einsum("tmk,tk,tkn->tmn", factors["U"], factors["S"], factors["Vh"])
    assert rel(got, ref.tsv_c(d)) <= 1e-5


@pytest.mark.parametrize("dtype, k, opt_in", [(torch.float64, 32, True),
                                               (torch.float32, 120, True),
                                               (torch.float32, 32, False)])
def test_mixed_precision_is_skipped_where_it_cannot_win(monkeypatch, dtype, k, opt_in):
    """float64 input needs no refinement; k + p past half the short side costs more than the
    float64 Gram it would replace; callers that feed a polar factor do not opt in."""
    spectrum = torch.arange(1, 257, dtype=torch.float64) ** -1.0
    x = spectrum_matrix(384, 256, spectrum, seed=2).to(dtype)
    outcomes = spy_mixed(monkeypatch)
    u, s, vh = linalg.top_svd(x, k, float32_subspace=opt_in)
    assert outcomes == []
    assert rel((u * s) @ vh, top_k_product(x, k)) <= 1e-6


# -- robustness and the registry ---------------------------------------------------------------
def test_svd_falls_back_and_records_it(monkeypatch):
    real = torch.linalg.svd
    calls = {"n": 0}

    def flaky(x, full_matrices=True):
        calls["n"] += 1
        if calls["n"] <= 2:  # both orientations fail in float32
            raise torch.linalg.LinAlgError("did not converge")
        return real(x, full_matrices=full_matrices)

    monkeypatch.setattr(linalg.torch.linalg, "svd", flaky)
    x = torch.randn(30, 20)
    with numerics_log() as log:
        u, s, vh = svd(x)
    assert u.dtype == torch.float32 and rel((u * s) @ vh, x) < 1e-5
    assert log.svd_calls == 1 and any("float64" in e for e in log.events)


@pytest.mark.parametrize("shape", [(20, 50), (50, 20)])
def test_svd_of_either_orientation_reconstructs(shape):
    x = torch.randn(*shape, dtype=torch.float64)
    u, s, vh = svd(x)
    assert u.shape == (shape[0], min(shape)) and vh.shape == (min(shape), shape[1])
    assert rel((u * s) @ vh, x) < 1e-12
    assert torch.all(s[:-1] >= s[1:])


def test_registry_errors_are_clear():
    with pytest.raises(InputError, match="iso_cts"):
        get_method("iso_ctss")
    with pytest.raises(InputError, match="common_space_fraction"):
        get_method("iso_cts").resolve_params({"fraction": 0.5})
    with pytest.raises(InputError):
        get_method("iso_cts").resolve_params({"common_space_fraction": 1.0})
    assert get_method("iso_cts").resolve_params({"common_space_fraction": "0.6"}) == {
        "common_space_fraction": 0.6}


def test_alpha_rules():
    assert get_method("average").alpha_for(8, None) == 1 / 8
    with pytest.raises(InputError, match="fixes alpha"):
        get_method("average").alpha_for(8, 0.5)
    with pytest.raises(InputError, match="needs --alpha"):
        get_method("iso_c").alpha_for(8, None)
    for bad in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(InputError):
            get_method("iso_c").alpha_for(8, bad)
    assert get_method("tsv_m").alpha_grid[0] == 0.1 and len(get_method("tsv_m").alpha_grid) == 30
    assert get_method("ties").alpha_grid[-1] == 1.0 and len(get_method("ties").alpha_grid) == 30


def test_iso_cts_fraction_too_small_for_the_rank_is_a_clear_error():
    """r=14, T=8, f=0.1: c0=1, ts=round(13/8)*8=16 > 14, so c would be -2."""
    assert iso_cts_dimensions(14, 8, 0.1) == (-2, 2)
    with pytest.raises(InputError, match="no valid split"):
        iso_cts(torch.randn(8, 14, 20), common_space_fraction=0.1)


# -- the subset eigensolver behind TSV-M's per-task top k ---------------------------------------
@pytest.mark.parametrize("shape,k", [((96, 96), 12), ((160, 64), 8), ((64, 160), 21)])
def test_subset_eigensolver_gives_the_full_eigh_top_k(shape, k, monkeypatch):
    """The top k from LAPACK's syevr (only k eigenvectors) equal the full eigh's, and TSV-M
    uses it: forcing the full eigh changes the result by rounding only."""
    x = power_law_tasks(1, *shape, seed=1)[0].double()
    rows = shape[0] <= shape[1]
    lam, w = linalg.top_gram_eigh(x, rows, k)
    gram = x @ x.mT if rows else x.mT @ x
    full_lam, full_w = torch.linalg.eigh(gram)
    assert lam.shape[0] == k and w.shape[1] == k  # only the top k were computed
    assert torch.allclose(lam, full_lam.flip(0)[:k], rtol=1e-12, atol=0)
    overlap = (w.mT @ full_w.flip(1)[:, :k]).abs().diagonal()  # same vectors up to sign
    assert torch.allclose(overlap, torch.ones(k, dtype=torch.float64), atol=1e-10)
    d = power_law_tasks(8, *shape, seed=2)
    subset = tsv_m(d)
    monkeypatch.setattr(linalg, "SUBSET_BELOW", 0.0)
    assert rel(tsv_m(d), subset) <= 1e-6


def test_tsv_with_more_tasks_than_rank_keeps_nothing_per_task():
    d = torch.randn(20, 10, 12)
    assert torch.equal(tsv_m(d), torch.zeros(10, 12))
    factors = tsv_c(d)
    assert factors["U"].shape == (20, 10, 0) and factors["Vh"].shape == (20, 0, 12)


def test_subset_eigensolver_is_bitwise_repeatable_at_a_fixed_thread_count():
    prior = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = power_law_tasks(1, 128, 128, seed=3)[0].double()
        first = linalg.top_gram_eigh(x, True, 16)
        second = linalg.top_gram_eigh(x.clone(), True, 16)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    finally:
        torch.set_num_threads(prior)
