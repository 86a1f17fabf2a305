"""Factor SVD re-compression equals dense SVD truncation, reports its true error, and rank rules keep their word."""

import math

import pytest
import torch

from lorakit_ext.errors import LorakitError
from lorakit_ext.merge.lowrank import LowRank, low_rank
from lorakit_ext.merge.svd import RankRule, merge_compressed, parse_dynamic, recompress_all, spectrum, truncate
from lorakit_ext.networks.weights import NetworkWeights
from tests.test_merge_algebra import CONV, LINEAR, SHAPES, module_of, relative

torch.set_num_threads(1)


def random_term(rows=40, columns=30, rank=12, seed=0) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(rows, rank, generator=g), torch.randn(rank, columns, generator=g), -0.37, None)


def test_factor_svd_equals_dense_svd():
    term = random_term()
    dense = term.dense().double()
    exact_s = torch.linalg.svdvals(dense)
    spec = spectrum(term)
    assert torch.allclose(spec.s.double(), exact_s[: spec.s.numel()], rtol=1e-5, atol=1e-5 * float(exact_s[0]))
    for rank in (1, 5, 12):
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        result = truncate(spec, rank)
        assert relative(result.term.dense(), best) < 1e-5
        measured = float((dense - result.term.dense().double()).norm() / dense.norm())
        optimum = float(s[rank:].norm() / s.norm())
        assert result.relative_error == pytest.approx(measured, rel=1e-4, abs=1e-6)
        assert result.relative_error == pytest.approx(optimum, rel=1e-4, abs=1e-6)
        assert result.retained == pytest.approx(1 - optimum**2, abs=1e-6)
    # balanced: both factors carry sqrt(s)
    top = truncate(spec, 3).term
    assert torch.allclose(top.up.norm(dim=0), top.down.norm(dim=1), rtol=1e-4)


def test_factor_svd_of_loha_and_tucker_modules():
    for kind, name in (("loha", LINEAR), ("tucker", CONV), ("lokr", CONV)):
        module = module_of(kind, SHAPES[name], seed=7)
        dense = module.delta(SHAPES[name]).reshape(SHAPES[name][0], -1).double()
        spec = spectrum(low_rank(module, SHAPES[name]))
        exact = torch.linalg.svdvals(dense)
        assert torch.allclose(spec.s.double(), exact[: spec.s.numel()], rtol=1e-4, atol=1e-4 * float(exact[0]))


def test_dynamic_rules_pick_what_they_promise():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])
    energy = (s**2).cumsum(0) / (s**2).sum()
    for target in (0.5, 0.9, 0.98, 0.99, 0.999):
        kept = RankRule(dynamic="sv_fro", value=target).keep(s, None)
        assert math.sqrt(energy[kept - 1]) >= target and (kept == 1 or math.sqrt(energy[kept - 2]) < target)
        # from the leading values only (a randomized SVD) with the whole ||ΔW||², the same choice
        assert RankRule(dynamic="sv_fro", value=target).keep(s[:3], None, float((s**2).sum())) == min(kept, 3)
    cumulative = s.cumsum(0) / s.sum()
    for target in (0.5, 0.8, 0.95):
        kept = RankRule(dynamic="sv_cumulative", value=target).keep(s, None)
        assert cumulative[kept - 1] >= target and (kept == 1 or cumulative[kept - 2] < target)
    assert RankRule(rank=2, dynamic="sv_fro", value=0.999).keep(s, None) == 2  # the rank caps a dynamic rule
    assert RankRule(rank=2, conv_rank=5).keep(s, (4, 4, 3, 3)) == 5
    assert RankRule(rank=2, conv_rank=5).keep(s, (4, 4, 1, 1)) == 2


def test_sv_ratio_threshold():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0])
    assert RankRule(dynamic="sv_ratio", value=4.0).keep(s, None) == 2  # keeps s >= 2.5
    assert RankRule(dynamic="sv_ratio", value=5.0).keep(s, None) == 3  # keeps s >= 2


def test_size_budget_fits_and_spends_it_where_error_drops_most():
    spectra = {"big": spectrum(random_term(40, 30, 12, seed=1)), "small": spectrum(random_term(40, 30, 12, seed=2))}
    spectra["small"].s.mul_(0.01)
    budget = 10 * (40 + 30) * 2
    terms, report = recompress_all(spectra, RankRule(dynamic="size", value=budget + 500), size_overhead_bytes=500)
    ranks = {name: rank for name, (rank, _, _) in report.modules.items()}
    assert sum(ranks.values()) * (40 + 30) * 2 <= budget
    assert ranks["big"] > ranks["small"] and sum(ranks.values()) == 10


def test_parse_dynamic():
    assert parse_dynamic("sv_fro:0.99") == ("sv_fro", 0.99)
    assert parse_dynamic("size:2MB") == ("size", 2 * 2**20)
    for bad in ("sv_fro:1.5", "sv_fro", "magic:3", "sv_ratio:x", "size:3XB", "sv_ratio:nan", "size:inf", "sv_ratio:0.5"):
        with pytest.raises(LorakitError, match="--dynamic"):
            parse_dynamic(bad)


def test_merge_compressed_matches_dense_optimum_and_reports_totals():
    networks = [
        NetworkWeights({LINEAR: module_of("lora", SHAPES[LINEAR], 1), CONV: module_of("lora", SHAPES[CONV], 2)}),
        NetworkWeights({LINEAR: module_of("loha", SHAPES[LINEAR], 3), CONV: module_of("tucker", SHAPES[CONV], 4)}),
    ]
    ratios = [1.0, -1.0]
    merged, report = merge_compressed(networks, ratios, RankRule(rank=3, conv_rank=2))
    lost = total = 0.0
    for name, rank in ((LINEAR, 3), (CONV, 2)):
        exact = sum(r * n.modules[name].delta(SHAPES[name]) for n, r in zip(networks, ratios)).reshape(10, -1).double()
        s = torch.linalg.svdvals(exact)
        got = merged.modules[name].delta(SHAPES[name]).reshape(10, -1).double()
        measured = float((exact - got).norm() / exact.norm())
        assert merged.modules[name].rank == rank
        assert measured == pytest.approx(float(s[rank:].norm() / s.norm()), rel=1e-4)
        assert report.modules[name][2] == pytest.approx(measured, rel=1e-4)
        lost += float((exact - got).norm() ** 2)
        total += float(exact.norm() ** 2)
    assert report.relative_error == pytest.approx(math.sqrt(lost / total), rel=1e-4)
    assert report.retained == pytest.approx(1 - lost / total, rel=1e-4)


def test_clamp_quantile_clamps_and_reports_measured_error():
    spec = spectrum(random_term(seed=3))
    clamped = truncate(spec, 6, clamp_quantile=0.9)
    plain = truncate(spec, 6)
    limit = torch.cat([plain.term.up.flatten(), plain.term.down.flatten()]).abs().quantile(0.9)
    assert clamped.term.up.abs().max() <= limit + 1e-6
    dense = (spec.left.double() * spec.s) @ spec.right.double()
    measured = float((dense - clamped.term.dense().double()).norm() / dense.norm())
    assert clamped.relative_error == pytest.approx(measured, rel=1e-4)
    assert clamped.relative_error > plain.relative_error
